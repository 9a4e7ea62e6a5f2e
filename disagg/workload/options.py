"""Command-line workload selection shared by replay, compare and simulate: a trace file or generated agent
sessions, plus the TraceScale applied to it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from disagg.config import EngineConfig
from disagg.model_store import DEFAULT_VOCAB_SIZE
from disagg.options import add_options
from disagg.workload import agent, loaders
from disagg.workload.record import TraceRequest, TraceScale


@dataclass
class WorkloadOptions:
    """A trace file or generated agent sessions, and how to scale it (one option per field)."""

    trace: str | None = field(
        default=None,
        metadata={
            "help": "JSONL (Mooncake format) or CSV trace; a bare name is looked up in ../shared/data/traces "
            "(e.g. mooncake_conversation_trace.jsonl)"
        },
    )
    agent: str | None = field(
        default=None,
        metadata={
            "help": "generate agent sessions instead: profile or mix "
            f"({', '.join(agent.PROFILES)}; e.g. coding_agent:2,short_chat:1)"
        },
    )
    sessions: int = field(default=20, metadata={"help": "agent sessions to generate"})
    session_rate: float = field(default=0.5, metadata={"help": "agent sessions per second (Poisson)"})
    limit: int | None = field(default=None, metadata={"help": "first N requests of the workload"})
    seed: int = field(default=0, metadata={"help": "seed of the generated sessions"})
    block_tokens: int = field(
        default=EngineConfig.block_size, metadata={"help": "tokens per trace hash_id (512 in the traces)"}
    )
    output_scale: float | None = field(
        default=None, metadata={"help": "factor on output lengths (default: the same as the input factor)"}
    )
    time_scale: float = field(default=1.0, metadata={"help": "replay speed-up on timestamps and think times"})
    max_input_tokens: int | None = field(default=None, metadata={"help": "cap on prompt tokens"})
    max_output_tokens: int | None = field(default=None, metadata={"help": "cap on output tokens"})
    vocab_size: int = field(default=DEFAULT_VOCAB_SIZE, metadata={"help": "token ids are drawn below this"})


def add_workload_args(p: argparse.ArgumentParser) -> None:
    add_options(p.add_argument_group("workload"), WorkloadOptions)


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
