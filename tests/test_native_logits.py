"""The logits scan (`disagg_kernels/cpu_logits.cpp`): per row of a step's logits, its greedy token and whether all
its values are finite, in one pass.  The runner's tokens come from it on CPU, so it must give torch's argmax (the
first of tied maxima) and torch's finite check on every build: AVX-512, AVX2 and the portable loop."""

import pytest
import torch
from native_kernels import native_for

from disagg.engine.sampler import logit_scan, scan_logits

MARCHES = ["native", "haswell", "x86-64"]


def _cases() -> list[torch.Tensor]:
    """Rows with many tied maxima (small integers), widths with vector tails, a maximum in the last lane, NaN and
    infinities in one row of a batch, signed zeros only."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for b, v in [(1, 49152), (3, 17), (8, 4099), (5, 1), (2, 33), (40, 1000), (1, 7)]:
        for trial in range(6):
            x = torch.randint(-5, 6, (b, v), generator=g).float()
            if trial == 1:
                x[0, -1] = 100.0  # the maximum in the tail
            if trial == 2:
                x[b - 1, v // 2] = float("nan")
            if trial == 3:
                x[0, 0] = float("-inf")
                x[b - 1, v - 1] = float("inf")
            if trial == 4:
                x[:] = -0.0
                x[0, v - 1] = 0.0  # ties with -0.0: the first index wins, as in torch
            if trial == 5:
                x = torch.randn(b, v, generator=g) * 1e30
            cases.append(x)
    return cases


@pytest.mark.parametrize("march", MARCHES)
def test_the_native_scan_is_torchs_argmax_and_finite_check(march, kernel_builds):
    native = native_for(kernel_builds, march)
    for x in _cases():
        tokens, finite = native.scan_logits(x)
        want_tokens, want_finite = scan_logits(x)
        assert finite == want_finite, tuple(x.shape)
        for row, ok in enumerate(want_finite):
            if ok:  # a row that is not finite has no token (it yields NONFINITE_TOKEN)
                assert tokens[row] == want_tokens[row], (tuple(x.shape), row)


def test_the_runners_scan_takes_the_native_pass_for_float32_cpu_logits_only(kernel_builds):
    native = native_for(kernel_builds, "native")
    calls = []

    class Counting:
        def scan_logits(self, logits):
            calls.append(logits.dtype)
            return native.scan_logits(logits)

    scan = logit_scan(Counting())  # type: ignore[arg-type]
    x = torch.randn(2, 300)
    assert scan(x) == scan_logits(x)
    assert scan(x.bfloat16()) == scan_logits(x.bfloat16())  # torch's: the native pass reads float32
    assert calls == [torch.float32]
    assert logit_scan(None) is scan_logits


def test_which_runners_scan_natively(tiny_llama_dir):
    """Where the native kernels are loaded anyway (a quantized model's, a CPU native step's: a float32 model's
    too) the runner scans with them; a bfloat16 CPU model (no native step) keeps torch's scan and builds nothing
    for it."""
    from disagg.config import EngineConfig
    from disagg.engine.engine import LLMEngine

    quantized = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, quantization="int8")).runner
    assert quantized.native_step is not None and quantized.scan is not scan_logits
    float32 = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64)).runner
    assert float32.native_step is not None and float32.scan is not scan_logits
    bf16 = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, dtype="bfloat16")).runner
    assert bf16.native_step is None and bf16.scan is scan_logits
