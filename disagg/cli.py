"""`disagg` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from disagg.config import EngineConfig
    from disagg.engine.engine import LLMEngine
    from disagg.protocol import SamplingParams

    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, max_model_len=args.max_model_len))
    print(f"loaded {engine.config.model} on {engine.device} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    sampling = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    prompts = []
    for text in args.prompt:
        if args.raw or engine.tokenizer is None or not engine.tokenizer.chat_template:
            prompts.append(text)
        else:
            prompts.append(engine.tokenizer.encode_chat([{"role": "user", "content": text}]))
    t0 = time.perf_counter()
    results = engine.generate(prompts, sampling)
    elapsed = time.perf_counter() - t0
    total = sum(len(r.token_ids) for r in results)
    for text, r in zip(args.prompt, results):
        print(
            f">>> {text}\n{r.text}\n[{len(r.token_ids)} tokens, finish={r.finish_reason}, "
            f"ttft={r.ttft_s * 1000:.0f} ms]"
        )
    print(f"{total} tokens in {elapsed:.2f}s = {total / elapsed:.1f} tokens/s ({len(results)} request(s) batched)")
    return 0


_BENCH_TOOLS = {
    "replay": ("bench.replay", "replay a trace against any OpenAI-compatible URL"),
    "compare": ("bench.compare", "start cluster configurations and compare them on one workload"),
    "agent": ("bench.traces.agent", "write generated agent sessions as a JSONL trace"),
    "simulate": ("bench.sim.run", "drive the real router with simulated workers (16-256)"),
    "calibrate": ("bench.sim.calibrate", "fit the simulated workers' time model to the real engine"),
    "chaos": ("bench.chaos", "replay a workload while killing, stopping and breaking workers; recovery report"),
    "overload": ("bench.overload", "admission control under 0.5x-4x load, two tenants, priorities"),
}


def _plan(args: argparse.Namespace) -> int:
    from bench.plan import main as plan_main

    return plan_main(args.rest)


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(_BENCH_TOOLS[args.tool][0])
    return module.main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions locally with one engine")
    gen.add_argument("prompt", nargs="+", help="prompt text (several prompts are batched together)")
    gen.add_argument("--model", default="", help="HF-format model directory (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    gen.set_defaults(func=_generate)
    from disagg.cluster.launch import build_parser, serve

    srv = sub.add_parser("serve", help="start workers + router on Ray and serve the OpenAI-compatible API")
    build_parser(srv)
    srv.set_defaults(func=serve)
    plan = sub.add_parser(
        "plan", help="rank prefill:decode splits for a workload and SLOs (calibrated simulator)", add_help=False
    )
    plan.add_argument("rest", nargs=argparse.REMAINDER)
    plan.set_defaults(func=_plan)
    bench = sub.add_parser(
        "bench", help="bench harness: replay traces, compare configurations, simulate", add_help=False
    )
    bench.add_argument(
        "tool", choices=sorted(_BENCH_TOOLS), help="; ".join(f"{k}: {v[1]}" for k, v in sorted(_BENCH_TOOLS.items()))
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # its own parser takes every option (argparse's REMAINDER would stop at "--x")
        return _plan(argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
