"""`disagg` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from importlib.metadata import entry_points


def _add_generate_options(gen: argparse.ArgumentParser) -> None:
    from disagg.config import EngineConfig
    from disagg.options import add_options
    from disagg.sampling import SamplingParams

    engine_options = (
        *("model", "device", "max_model_len"),
        *("quantization", "quant_activations", "quant_repack", "kv_dtype", "speculative"),
    )
    add_options(gen, EngineConfig, only=engine_options)
    # a local demo: deterministic (greedy) and long enough to read, where an API request's defaults are OpenAI's
    add_options(gen, SamplingParams, only=("max_tokens", "temperature", "top_p", "seed"), defaults=GENERATE_SAMPLING)


GENERATE_SAMPLING = {"max_tokens": 64, "temperature": 0.0}  # `disagg generate`'s own defaults (see above)


def _generate(args: argparse.Namespace) -> int:
    from disagg.config import EngineConfig
    from disagg.engine.engine import LLMEngine
    from disagg.options import from_options
    from disagg.protocol import SamplingParams

    t0 = time.perf_counter()
    engine = LLMEngine(from_options(EngineConfig, args))
    print(f"loaded {engine.config.model} on {engine.device} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    sampling = from_options(SamplingParams, args)
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


ToolMain = Callable[[list[str]], int]


def _simulate() -> ToolMain:
    from disagg.sim.run import main

    return main


def _agent() -> ToolMain:
    from disagg.workload.agent import main

    return main


# `disagg bench` tools that are part of the product: name -> (loader of its main, help).  The lab's tools (bench/:
# real-cluster replays and studies) are plugins registered in the BENCH_GROUP entry-point group (pyproject.toml),
# so the product never imports bench/.
_PRODUCT_TOOLS: dict[str, tuple[Callable[[], ToolMain], str]] = {
    "simulate": (_simulate, "drive the real router with simulated workers (16-256)"),
    "agent": (_agent, "write generated agent sessions as a JSONL trace"),
}
BENCH_GROUP = "disagg.bench"


def bench_tools() -> dict[str, Callable[[], ToolMain]]:
    """Tool name -> a loader of its main(argv): the product's tools, then the plugins of BENCH_GROUP (a plugin
    cannot replace a product tool).  Loaders, so that building the parser imports no tool."""
    tools = {name: load for name, (load, _) in _PRODUCT_TOOLS.items()}
    for ep in entry_points(group=BENCH_GROUP):
        tools.setdefault(ep.name, ep.load)
    return tools


def _plan(args: argparse.Namespace) -> int:
    from disagg.planning.cli import main as plan_main

    return plan_main(args.rest)


def _bench(args: argparse.Namespace) -> int:
    return bench_tools()[args.tool]()(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions locally with one engine")
    gen.add_argument("prompt", nargs="+", help="prompt text (several prompts are batched together)")
    _add_generate_options(gen)
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    gen.set_defaults(func=_generate)
    from disagg.cluster.serve_cli import build_parser, serve

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
    described = {name: _PRODUCT_TOOLS[name][1] if name in _PRODUCT_TOOLS else "bench harness" for name in bench_tools()}
    bench.add_argument(
        "tool", choices=sorted(described), help="; ".join(f"{k}: {v}" for k, v in sorted(described.items()))
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
