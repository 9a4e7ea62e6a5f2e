"""The GPU path of `--quantization`: the Triton block matmul (run under TRITON_INTERPRET=1 where there is no GPU)
against the torch reference, for every block format, float32 and bfloat16 activations, batch widths that do and
do not fill a tile; and a model served through it - the kernels are a seam the runner is given."""

import pytest
import torch

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.quant import QuantKernels, TritonQuantKernels, check_quantizable, quant_kernels
from disagg.engine.runner import load_model
from disagg.modes import Quantization
from disagg.protocol import SamplingParams
from disagg_kernels.cpu_quant import BlockFormat, matmul_reference, quantize
from disagg_kernels.quant_triton import block_matmul_triton


@pytest.mark.parametrize("fmt", [f for f in BlockFormat if f is not BlockFormat.F32])  # F32: the CPU step's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_block_matmul_equals_the_reference(fmt, dtype):
    gen = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(40, 96, generator=gen), fmt)  # 40 columns: a full tile and a partial one
    for rows in (1, 5, 17):
        x = torch.randn(rows, 96, generator=gen).to(dtype)
        got = block_matmul_triton(x, w)
        want = matmul_reference(x.float(), w)
        assert got.dtype == dtype and got.shape == want.shape
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_a_model_served_through_the_triton_kernels_gives_the_native_kernels_tokens(tiny_llama_dir):
    cfg = EngineConfig(model=str(tiny_llama_dir), num_blocks=64, max_model_len=256, quantization="q4")
    prompts = [list(range(3, 3 + n)) for n in (5, 21)]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [r.token_ids for r in LLMEngine(cfg).generate(prompts, greedy)]
    runner, tokenizer = load_model(cfg, kernels=TritonQuantKernels())
    assert runner.kernel_path == "triton"
    assert [r.token_ids for r in LLMEngine(cfg, runner, tokenizer).generate(prompts, greedy)] == want


def test_the_kernels_name_the_activation_dtypes_they_take():
    with pytest.raises(ValueError, match=r"the native-\w+ kernels compute in \['float32'\]|torch-reference"):
        check_quantizable(Quantization.Q4, quant_kernels(torch.device("cpu")), torch.bfloat16)
    check_quantizable(Quantization.Q4, TritonQuantKernels(), torch.bfloat16)  # the GPU path: bfloat16 activations
    assert isinstance(quant_kernels(torch.device("cuda")), TritonQuantKernels)
    assert isinstance(quant_kernels(torch.device("cpu")), QuantKernels)
