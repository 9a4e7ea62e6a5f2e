"""How a traced cluster's model steps compare with the calibrated step-time model, from the `engine.step` spans
its workers wrote (`--trace`: disagg/cluster/spans.py).  For each worker:

- model:  the model's own time (the runner's) / the time model's prediction for the same features, by how many
          other workers were inside a step over this one's span (time-weighted; what sharing the machine costs a
          step: the simulator applies it the same way, as processor sharing, disagg/sim/cores.py);
- engine: the engine's whole step minus the model (scheduling, sampling, stop rules, KV bookkeeping);
- loop:   the gap from one step's end to the next step's start, when the next one follows within `--busy-gap-ms`
          (a busy worker: the executor hop, delivering tokens, publishing KV events, the tick's lease work).

    .venv/bin/python -m bench.sim.steps --spans OUT/spans/conversation-2x-disagg-kv-0 \\
        --time-model bench/results/time_model.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disagg.cluster.spans import STEP_ATTENTION_KPAIRS, STEP_EXECUTE_S, STEP_SEQS, STEP_TOKENS
from disagg.options import add_options, from_options
from disagg.sim.timemodel import StepTimeModel

# step-size classes of the co-run factor (tokens, upper bounds): decode steps, small mixed steps, prefill chunks
# (the engine's default step budget is 512 tokens; larger steps fall in the last class)
CORUN_EDGES = (16, 128, 512)
MIN_SAMPLES = 5


@dataclass
class StepsOptions:
    spans: str = field(metadata={"help": "a traced run's span directory (one JSONL file per process)"})
    time_model: str = field(default="", metadata={"help": "the calibrated step-time model (JSON); none: defaults"})
    busy_gap_ms: float = field(
        default=50.0, metadata={"help": "a gap between steps up to this long counts as the loop's own time"}
    )


@dataclass(frozen=True)
class Step:
    worker: str
    start_s: float
    end_s: float
    features: tuple[float, float, float, float]
    execute_s: float


def load_steps(directory: str | Path) -> dict[str, list[Step]]:
    """worker file -> its engine.step spans in start order."""
    out: dict[str, list[Step]] = {}
    for path in sorted(Path(directory).glob("*.jsonl")):
        steps = []
        for line in path.read_text().splitlines():
            span = json.loads(line) if line.strip() else {}
            if span.get("name") != "engine.step":
                continue
            a = span["attributes"]
            steps.append(
                Step(
                    path.stem,
                    span["start_ns"] / 1e9,
                    span["end_ns"] / 1e9,
                    (1.0, float(a[STEP_TOKENS]), float(a[STEP_SEQS]), float(a[STEP_ATTENTION_KPAIRS])),
                    float(a[STEP_EXECUTE_S]),
                )
            )
        if steps:
            out[path.stem] = sorted(steps, key=lambda s: s.start_s)
    return out


# a step counts as run beside k others when the time-weighted count over its span is within this of k; steps in
# between (others started or ended midway) are left out of the per-count factors
COUNT_TOLERANCE = 0.25


@dataclass(frozen=True)
class Measured:
    step: Step
    busy_others: int  # other workers inside a step over this one's span (time-weighted, rounded); -1: in between
    ratio: float  # the model's own time over the time model's prediction


def measure(by_worker: dict[str, list[Step]], model: StepTimeModel) -> dict[str, list[Measured]]:
    """Every worker's steps with how many others were busy over their span and their time over the prediction.
    Over the span, not at the start: a long prefill chunk that starts alone and runs beside three decode loops
    is a step beside three others, as the simulator prices it."""
    starts = {w: [s.start_s for s in steps] for w, steps in by_worker.items()}
    out = {}
    for worker, steps in by_worker.items():
        others = [(starts[w], s) for w, s in by_worker.items() if w != worker]
        out[worker] = [
            Measured(s, _busy_others(s, others), s.execute_s / model.predict(list(s.features))) for s in steps
        ]
    return out


def _busy_others(step: Step, others: list[tuple[list[float], list[Step]]]) -> int:
    span = step.end_s - step.start_s
    if span <= 0:
        return -1
    overlap = 0.0
    for starts, steps in others:
        i = max(0, bisect.bisect_right(starts, step.start_s) - 1)
        while i < len(steps) and steps[i].start_s < step.end_s:
            overlap += max(0.0, min(steps[i].end_s, step.end_s) - max(steps[i].start_s, step.start_s))
            i += 1
    mean = overlap / span
    return round(mean) if abs(mean - round(mean)) <= COUNT_TOLERANCE else -1


def _summary(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
    return {"n": len(xs), "p10": q[0], "p50": statistics.median(xs), "p90": q[-1], "mean": statistics.fmean(xs)}


def analyse(by_worker: dict[str, list[Step]], model: StepTimeModel, busy_gap_s: float) -> dict[str, dict]:
    report: dict[str, dict] = {}
    for worker, measured in measure(by_worker, model).items():
        steps = by_worker[worker]
        ratio: dict[int, list[float]] = defaultdict(list)
        for m in measured:
            if m.busy_others >= 0:
                ratio[m.busy_others].append(m.ratio)
        gaps = [b.start_s - a.end_s for a, b in zip(steps, steps[1:]) if b.start_s - a.end_s <= busy_gap_s]
        report[worker] = {
            "steps": len(steps),
            "model_over_predicted_by_busy_others": {k: _summary(v) for k, v in sorted(ratio.items())},
            "engine_overhead_ms": _summary([(s.end_s - s.start_s - s.execute_s) * 1e3 for s in steps]),
            "loop_gap_ms": _summary([g * 1e3 for g in gaps]),
        }
    return report


def corun_by_tokens(
    by_worker: dict[str, list[Step]], model: StepTimeModel, edges: tuple[int, ...] = CORUN_EDGES
) -> dict[str, Any]:
    """The co-run factor by step size: for steps of up to `edge` tokens (above the previous edge), the median of
    model time / prediction beside one other worker's steps (over its span), over the same median beside none.
    Only one other: with more, the steps also wait for a core, which `by_busy` measures and the simulator
    multiplies in (counting those steps here too would charge the wait twice).  A size class with
    fewer than MIN_SAMPLES steps either way takes the factor of all steps together."""
    measured = [m for ms in measure(by_worker, model).values() for m in ms]
    alone: dict[int, list[float]] = defaultdict(list)
    busy: dict[int, list[float]] = defaultdict(list)
    for m in measured:
        if m.busy_others not in (0, 1):  # co-run: beside one other (more: oversubscription, below)
            continue
        edge = next((e for e in edges if m.step.features[1] <= e), edges[-1])
        (busy if m.busy_others else alone)[edge].append(m.ratio)
    all_alone = [r for rs in alone.values() for r in rs]
    all_busy = [r for rs in busy.values() for r in rs]
    overall = statistics.median(all_busy) / statistics.median(all_alone) if all_alone and all_busy else 1.0
    by_tokens = []
    for edge in edges:
        enough = len(alone[edge]) >= MIN_SAMPLES and len(busy[edge]) >= MIN_SAMPLES
        factor = statistics.median(busy[edge]) / statistics.median(alone[edge]) if enough else overall
        by_tokens.append([edge, factor, len(busy[edge]), len(alone[edge])])
    return {
        "corun_slowdown": overall,
        "by_tokens": by_tokens,
        "by_busy": oversubscription(measured),
        "steps": len(all_alone) + len(all_busy),
    }


def oversubscription(measured: list[Measured]) -> list[list[float]]:
    """[k, factor, steps] for k other workers busy over a step's span (k >= 1; steps between two counts left out):
    the median model time / prediction beside k others over the same beside one.  With more engines than cores
    each step also waits for its turn on a core, and that costs more than the share of the cores (context
    switches, evicted caches).  Only counts with MIN_SAMPLES steps or more are given, and a factor never falls
    below the one before it."""
    ratios: dict[int, list[float]] = defaultdict(list)
    for m in measured:
        ratios[m.busy_others].append(m.ratio)
    if len(ratios[1]) < MIN_SAMPLES:
        return []
    one = statistics.median(ratios[1])
    out, floor = [], 1.0
    for k in sorted(k for k in ratios if k >= 1 and len(ratios[k]) >= MIN_SAMPLES):
        floor = max(floor, statistics.median(ratios[k]) / one)
        out.append([k, floor, len(ratios[k])])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.sim.steps", description=__doc__.splitlines()[0])
    add_options(p, StepsOptions)
    opts = from_options(StepsOptions, p.parse_args(argv))
    model = StepTimeModel.load(opts.time_model) if opts.time_model else StepTimeModel()
    print(json.dumps(analyse(load_steps(opts.spans), model, opts.busy_gap_ms / 1e3), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
