"""Generated multi-turn agent sessions (the published Mooncake tool-agent trace is not available here).

A session starts with the workload's shared system prompt + tool schema and a user message.  Every later turn
appends the model's previous output and a tool result (or the user's follow-up) to the growing context and is
sent after a think time (tool-call latency or user typing).  Sessions arrive as a Poisson process, so many run in
parallel.  Lengths are in native tokens with 512-token hash_id blocks, like the Mooncake traces, so the same
TraceScale shrinks both; the output is the same JSONL plus session_id, turn and think_time_ms.

Block identity follows the real cache: a block that is full in turn k keeps its hash_id in turn k+1; the last,
partial block of turn k changes content when text is appended, so it gets a new id.  Sampling is log-uniform
between each range's bounds.  Everything is deterministic for a given seed.

    python -m disagg.workload.agent --profile coding_agent --sessions 50 --rate 0.5 --out agent.jsonl
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import asdict, dataclass, field

from disagg.options import add_options
from disagg.utils import cdiv
from disagg.workload.record import TraceRequest

NATIVE_BLOCK = 512
_SHARED_ID_BASE = 1_000_000_000  # system-prompt blocks: 1e9 + profile index * 1e6 + i
_SESSION_ID_BASE = 2_000_000_000  # everything else: fresh ids from here


@dataclass(frozen=True)
class AgentProfile:
    name: str
    system_tokens: int  # system prompt + tool schema, identical for every session of this profile
    user_tokens: tuple[int, int]  # the opening user message
    turns: tuple[int, int]  # model calls per session
    tool_output_tokens: tuple[int, int]  # appended before each later turn (tool result / user follow-up)
    output_tokens: tuple[int, int]  # the model's output per turn (tool call or answer)
    think_time_s: tuple[float, float]  # gap between a turn finishing and the next being sent
    max_context_tokens: int  # a session ends before its context would grow past this


PROFILES: dict[str, AgentProfile] = {
    p.name: p
    for p in (
        AgentProfile(
            "short_chat",
            system_tokens=1024,
            user_tokens=(50, 300),
            turns=(2, 5),
            tool_output_tokens=(30, 200),
            output_tokens=(100, 400),
            think_time_s=(2.0, 10.0),
            max_context_tokens=16_384,
        ),
        AgentProfile(
            "coding_agent",
            system_tokens=6144,
            user_tokens=(200, 800),
            turns=(6, 20),
            tool_output_tokens=(500, 4000),
            output_tokens=(80, 400),
            think_time_s=(0.5, 5.0),
            max_context_tokens=49_152,
        ),
        AgentProfile(
            "deep_research",
            system_tokens=3072,
            user_tokens=(100, 400),
            turns=(15, 40),
            tool_output_tokens=(1000, 3000),
            output_tokens=(50, 250),
            think_time_s=(1.0, 8.0),
            max_context_tokens=65_536,
        ),
    )
}


class _Context:
    """A growing token sequence as hash_ids over NATIVE_BLOCK-token blocks."""

    def __init__(self, shared_ids: list[int], length: int, next_id: list[int]) -> None:
        self.ids, self.length, self._next = list(shared_ids), length, next_id

    def _fresh(self) -> int:
        self._next[0] += 1
        return self._next[0]

    def append(self, n: int) -> None:
        if n <= 0:
            return
        if self.length % NATIVE_BLOCK:  # the partial last block's content changes
            self.ids[-1] = self._fresh()
        self.length += n
        while len(self.ids) < cdiv(self.length, NATIVE_BLOCK):
            self.ids.append(self._fresh())


def _log_uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return lo if lo >= hi else math.exp(rng.uniform(math.log(lo), math.log(hi)))


def generate(profiles: dict[str, float], num_sessions: int, session_rate: float, seed: int = 0) -> list[TraceRequest]:
    """Sessions drawn from `profiles` ({name: weight}), arriving at `session_rate` per second (Poisson)."""
    unknown = set(profiles) - PROFILES.keys()
    if unknown:
        raise ValueError(f"unknown agent profile(s) {sorted(unknown)}; known: {sorted(PROFILES)}")
    if num_sessions <= 0 or session_rate <= 0:
        raise ValueError("num_sessions and session_rate must be positive")
    rng = random.Random(seed)
    names, weights = list(profiles), list(profiles.values())
    next_id = [_SESSION_ID_BASE]
    out: list[TraceRequest] = []
    start = 0.0
    for s in range(num_sessions):
        start += rng.expovariate(session_rate)
        p = PROFILES[rng.choices(names, weights)[0]]
        shared = [
            _SHARED_ID_BASE + list(PROFILES).index(p.name) * 1_000_000 + i
            for i in range(cdiv(p.system_tokens, NATIVE_BLOCK))
        ]
        ctx = _Context(shared, p.system_tokens, next_id)
        ctx.append(round(_log_uniform(rng, p.user_tokens)))
        now, turns = start, round(_log_uniform(rng, p.turns))
        last_output = 0  # the previous turn's output (read from the second turn on)
        for turn in range(turns):
            think = 0.0
            if turn:
                grow = round(_log_uniform(rng, p.tool_output_tokens))
                if ctx.length + last_output + grow >= p.max_context_tokens:
                    break
                ctx.append(last_output)
                ctx.append(grow)
                think = _log_uniform(rng, p.think_time_s)
                now += think
            last_output = round(_log_uniform(rng, p.output_tokens))
            out.append(
                TraceRequest(
                    timestamp_ms=round(now * 1000, 3),
                    input_length=ctx.length,
                    output_length=last_output,
                    hash_ids=list(ctx.ids),
                    session_id=f"{p.name}-{seed}-{s}",
                    turn=turn,
                    think_time_ms=round(think * 1000, 3),
                )
            )
    out.sort(key=lambda r: (r.timestamp_ms, r.session_id, r.turn))
    return out


def parse_mix(text: str) -> dict[str, float]:
    """'coding_agent' or 'coding_agent:2,short_chat:1' -> {name: weight}."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition(":")
        mix[name] = float(weight) if weight else 1.0
    return mix


@dataclass
class AgentTraceOptions:
    """`disagg bench agent`'s options."""

    out: str = field(metadata={"help": "the trace file to write (JSONL)"})
    profile: str = field(
        default="coding_agent",
        metadata={"help": f"profile or weighted mix, e.g. coding_agent:2,short_chat:1 ({', '.join(PROFILES)})"},
    )
    sessions: int = field(default=50, metadata={"help": "sessions to generate"})
    rate: float = field(default=0.5, metadata={"help": "new sessions per second (Poisson)"})
    seed: int = field(default=0, metadata={"help": "random seed (the same seed gives the same trace)"})
    show_profiles: bool = field(default=False, metadata={"help": "print the profiles first"})


def main(argv: list[str] | None = None) -> int:
    from disagg.workload.loaders import write_jsonl

    parser = argparse.ArgumentParser(prog="disagg bench agent", description=__doc__.splitlines()[0])
    add_options(parser, AgentTraceOptions)
    args = parser.parse_args(argv)
    if args.show_profiles:
        for p in PROFILES.values():
            print(asdict(p))
    trace = generate(parse_mix(args.profile), args.sessions, args.rate, args.seed)
    write_jsonl(trace, args.out)
    print(f"wrote {len(trace)} turns of {args.sessions} sessions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
