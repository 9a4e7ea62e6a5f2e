"""Command-line workload selection shared by replay, compare and simulate: a trace file or generated agent
sessions, plus the TraceScale applied to it."""

from __future__ import annotations

import argparse
from typing import Any

from disagg.model_store import DEFAULT_VOCAB_SIZE
from disagg.workload import agent, loaders
from disagg.workload.record import TraceRequest, TraceScale


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--trace",
        default=None,
        help="JSONL (Mooncake format) or CSV trace; a bare name is looked up "
        "in ../shared/data/traces (e.g. mooncake_conversation_trace.jsonl)",
    )
    g.add_argument(
        "--agent",
        default=None,
        help="generate agent sessions instead: profile or mix "
        f"({', '.join(agent.PROFILES)}; e.g. coding_agent:2,short_chat:1)",
    )
    g.add_argument("--sessions", type=int, default=20, help="agent sessions to generate")
    g.add_argument("--session-rate", type=float, default=0.5, help="agent sessions per second (Poisson)")
    g.add_argument("--limit", type=int, default=None, help="first N requests of the workload")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-tokens", type=int, default=16, help="tokens per trace hash_id (512 in the traces)")
    g.add_argument(
        "--output-scale",
        type=float,
        default=None,
        help="factor on output lengths (default: the same as the input factor)",
    )
    g.add_argument("--time-scale", type=float, default=1.0, help="replay speed-up on timestamps and think times")
    g.add_argument("--max-input-tokens", type=int, default=None)
    g.add_argument("--max-output-tokens", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="token ids are drawn below this")


def load_workload(args: argparse.Namespace) -> tuple[list[TraceRequest], TraceScale, dict[str, Any]]:
    if bool(args.trace) == bool(args.agent):
        raise SystemExit("choose one workload: --trace FILE or --agent PROFILE")
    if args.trace:
        trace = loaders.load(args.trace, args.limit)
        workload = {"name": str(args.trace), "requests": len(trace)}
    else:
        trace = agent.generate(agent.parse_mix(args.agent), args.sessions, args.session_rate, args.seed)
        if args.limit:
            trace = trace[: args.limit]
        workload = {
            "name": f"agent:{args.agent}",
            "sessions": args.sessions,
            "session_rate": args.session_rate,
            "seed": args.seed,
            "requests": len(trace),
        }
    scale = TraceScale(
        block_tokens=args.block_tokens,
        output_scale=args.output_scale,
        time_scale=args.time_scale,
        max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens,
    )
    return trace, scale, workload
