"""Fit the simulated workers' StepTimeModel to the real engine, then check how well the simulator predicts it.

1. Calibration: the real LLMEngine (default model, in-process, 1 thread) runs a grid of batches (prompt lengths
   x concurrency, with shared prefixes and decode-heavy phases); every step's features and wall time are fitted.
2. Validation (a different workload): the first --validate requests of the scaled Mooncake conversation trace
   arrive at their timestamps at the real engine (wall clock) and at a simulated one-worker cluster (virtual
   time, same engine settings, the fitted model); per-request TTFT / E2E and the makespan are compared.

    disagg bench calibrate --out bench/results/time_model.json
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import emit, print_table
from disagg.config import LAB_KV_CACHE_MB, EngineConfig
from disagg.engine.batch import ScheduledBatch
from disagg.engine.engine import LLMEngine
from disagg.engine.kv_cache import KVCache
from disagg.engine.model import ModelConfig
from disagg.engine.runner import ModelRunner, load_model
from disagg.engine.spec import Verified
from disagg.options import add_options, from_options
from disagg.protocol import LoRARef, TokenDelta
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.sim.timemodel import StepTimeModel, batch_features
from disagg.workload import loaders
from disagg.workload.metrics import mean, percentile
from disagg.workload.record import TraceRequest, TraceScale


def cpu_model() -> str:
    """The CPU's model name (every figure states the CPU it was measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Recorder:
    """A Runner around the real one: remembers the features of the batch each step executes."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.features: list[float] | None = None

    @property
    def model_config(self) -> ModelConfig:
        return self.runner.model_config

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def kv_cache(self) -> KVCache:
        return self.runner.kv_cache

    @property
    def last_step_s(self) -> float:
        return self.runner.last_step_s

    @property
    def last_logprobs(self) -> dict[int, list]:
        return self.runner.last_logprobs

    @property
    def last_verified(self) -> dict[int, Verified]:
        return self.runner.last_verified

    def load_lora(self, ref: LoRARef) -> None:
        self.runner.load_lora(ref)

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        self.features = batch_features(batch)
        return self.runner.execute(batch)


@dataclass
class CalibrateOptions:
    """The fit's own options (the engine's come from EngineConfig)."""

    threads: int = field(default=1, metadata={"help": "torch threads of the engine"})
    transfer_gbps: float = field(
        default=5.2,
        metadata={
            "help": "KV transfer bandwidth, GB/s (bench/kv_transfer.py measured ~5.2 GB/s over NIXL on loopback)"
        },
    )
    validate: int = field(default=40, metadata={"help": "conversation-trace requests in the check"})
    time_scale: float = field(default=0.1, metadata={"help": "replay pace of the check"})
    out: str = field(default="bench/results/time_model.json", metadata={"help": "JSON file the fitted model goes to"})


def _engine(args: argparse.Namespace) -> LLMEngine:
    """The real engine in this process, its runner recording each step's batch features."""
    config = from_options(EngineConfig, args, num_threads=args.threads)
    runner, tokenizer = load_model(config)
    return LLMEngine(config, _Recorder(runner), tokenizer)


@dataclass
class StepClock:
    """Wall, process CPU and this thread's CPU seconds of the steps of one phase.  `thread_share` is the share of a
    core the stepping thread got (~1 with one torch thread on a core of its own; less: another process took the
    core, or another thread of this process held the GIL): the fit and the check are comparable only when it is
    about the same in both.  `cpu_share` (the whole process) misses the second case: a busy thread of this process
    counts as this process's CPU.  With more than one torch thread, `thread_share` sits below 1 by design (the other
    intra-op threads' CPU is not this thread's); it is compared between the two phases, never with 1."""

    wall: float = 0.0
    cpu: float = 0.0
    thread_cpu: float = 0.0

    @property
    def cpu_share(self) -> float:
        return self.cpu / self.wall if self.wall else 0.0

    @property
    def thread_share(self) -> float:
        return self.thread_cpu / self.wall if self.wall else 0.0


def _timed_step(engine: LLMEngine, clock: StepClock) -> tuple[list[TokenDelta], float, list[float] | None]:
    recorder = engine.runner
    if not isinstance(recorder, _Recorder):
        raise TypeError("calibration needs an engine from _engine() (its runner records the batches)")
    recorder.features = None
    t0, c0, h0 = time.perf_counter(), time.process_time(), time.thread_time()
    deltas = engine.step()
    seconds = time.perf_counter() - t0
    clock.wall += seconds
    clock.cpu += time.process_time() - c0
    clock.thread_cpu += time.thread_time() - h0
    return deltas, seconds, recorder.features


def calibrate(engine, seed: int = 0, clock: StepClock | None = None) -> tuple[list[list[float]], list[float]]:
    from disagg.protocol import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    xs, ys = [], []
    grid = [(1, 64, 32), (4, 128, 24), (8, 300, 16), (16, 40, 32), (2, 900, 8), (32, 100, 16), (6, 500, 12)]
    shared = [rng.randrange(256, vocab) for _ in range(256)]
    for g, (n, length, out) in enumerate(grid):
        for i in range(n):
            prefix = shared[: rng.choice([0, 64, 128, 256])] if length > 256 else []
            prompt = prefix + [rng.randrange(256, vocab) for _ in range(length - len(prefix))]
            engine.add_request(f"cal-{g}-{i}", prompt, SamplingParams(max_tokens=out, ignore_eos=True))
        while engine.has_unfinished():
            _, seconds, features = _timed_step(engine, clock or StepClock())
            if features is not None:
                xs.append(features)
                ys.append(seconds)
    return xs, ys


def run_real(
    engine, trace: list[TraceRequest], scale: TraceScale, clock: StepClock | None = None
) -> dict[str, dict[str, float]]:
    """Wall-clock replay on the real engine; returns {request: {start, ttft, e2e}} in seconds."""
    from disagg.sim.cluster import sampling_for

    vocab = engine.model_config.vocab_size
    t_base = min(r.timestamp_ms for r in trace)
    pending = sorted(range(len(trace)), key=lambda i: trace[i].timestamp_ms)
    out: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and scale.seconds(trace[pending[0]].timestamp_ms - t_base) <= now:
            i = pending.pop(0)
            prompt = scale.prompt(trace[i], vocab, salt=i)[: engine.max_model_len - 1]
            rid = f"r{i}"
            engine.add_request(
                rid, prompt, sampling_for(max(1, min(scale.output_len(trace[i]), engine.max_model_len - len(prompt))))
            )
            out[rid] = {"start": scale.seconds(trace[i].timestamp_ms - t_base)}
        if not engine.has_unfinished():
            time.sleep(max(0.0, scale.seconds(trace[pending[0]].timestamp_ms - t_base) - now))
            continue
        deltas, _, _ = _timed_step(engine, clock or StepClock())
        t = time.perf_counter() - t0
        for d in deltas:
            rec = out[d.request_id]
            rec.setdefault("ttft", t - rec["start"])
            if d.finished:
                rec["e2e"] = t - rec["start"]
    return out


def run_sim(trace: list[TraceRequest], scale: TraceScale, model: StepTimeModel, engine) -> dict[str, dict]:
    from disagg.sim.cluster import SimClusterConfig
    from disagg.sim.run import simulate

    cfg = SimClusterConfig(
        num_prefill=0,
        num_decode=1,
        policy=PolicyConfig(kind=PolicyKind.KV),
        num_blocks=engine.pool.num_blocks,
        block_size=engine.config.block_size,
        max_num_seqs=engine.config.max_num_seqs,
        max_num_batched_tokens=engine.config.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
        vocab_size=engine.model_config.vocab_size,
    )
    result = simulate(trace, scale, cfg, model)
    return {f"r{r.index}": {"start": r.start_s, "ttft": r.ttft_s, "e2e": r.e2e_s} for r in result.records}


def compare(real: dict[str, dict], sim: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for key in ("ttft", "e2e"):
        r = [real[k][key] for k in real]
        s = [sim[k][key] for k in real]
        for stat, fn in (("mean", mean), ("p50", lambda v: percentile(v, 50)), ("p90", lambda v: percentile(v, 90))):
            rows.append(
                {
                    "metric": f"{key} {stat} (ms)",
                    "real": fn(r) * 1000,
                    "simulated": fn(s) * 1000,
                    "sim / real": fn(s) / fn(r),
                }
            )
        per_request = [abs(b - a) / a for a, b in zip(r, s) if a > 0]
        rows.append(
            {
                "metric": f"{key} per-request |error| median",
                "real": float("nan"),
                "simulated": float("nan"),
                "sim / real": percentile(per_request, 50),
            }
        )
    makespan_r = max(v["start"] + v["e2e"] for v in real.values())
    makespan_s = max(v["start"] + v["e2e"] for v in sim.values())
    rows.append(
        {
            "metric": "makespan (ms)",
            "real": makespan_r * 1000,
            "simulated": makespan_s * 1000,
            "sim / real": makespan_s / makespan_r,
        }
    )
    return rows


def tier_load_times(engine, blocks: int = 64, repeats: int = 3) -> tuple[float, float]:
    """Seconds per block the real TieredStore takes to load CPU -> device and disk -> device, for this engine's
    block shape (median of `repeats` rounds of `blocks` blocks)."""
    import shutil
    import statistics
    import tempfile
    from pathlib import Path

    from bench.offload import Rig

    kv = engine.kv_tensor
    assert kv is not None  # the real runner holds the device KV cache
    root = Path(tempfile.mkdtemp(prefix="calibrate-tiers-"))
    try:
        rig = Rig(blocks, tuple(kv.shape[1:]), kv.dtype, root)
        cpu, disk = [], []
        for _ in range(repeats):
            rig.cpu_store()
            cpu.append(rig.cpu_load())
            rig.disk_store()
            disk.append(rig.disk_load())
            rig.clear_disk()
        rig.store.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return statistics.median(cpu) / blocks, statistics.median(disk) / blocks


def _block_bytes(engine: LLMEngine) -> int:
    kv = engine.kv_tensor
    if kv is None:
        raise ValueError("calibration needs a real engine with a KV cache")
    return kv[0].numel() * kv.element_size()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg bench calibrate", description=__doc__.splitlines()[0])
    # the engine a lab worker runs (bench compare's KV cache size), so the fitted model prices those steps
    add_options(
        parser,
        EngineConfig,
        only=("model", "kv_cache_memory_mb", "max_model_len", "max_num_batched_tokens"),
        defaults={"kv_cache_memory_mb": LAB_KV_CACHE_MB},
    )
    add_options(parser, CalibrateOptions)
    args = parser.parse_args(argv)
    engine = _engine(args)
    fit_clock, check_clock = StepClock(), StepClock()
    xs, ys = calibrate(engine, clock=fit_clock)
    model = StepTimeModel.fit(
        xs,
        ys,
        transfer_bandwidth=args.transfer_gbps * 1e9,
        bytes_per_block=_block_bytes(engine),
        # the model's folder name, not its path: the file is committed and machines differ
        source=f"fitted on {len(ys)} steps of {Path(engine.config.model).name} "
        f"({args.threads} thread(s), {cpu_model()})",
    )
    model.cpu_load_s_per_block, model.disk_load_s_per_block = tier_load_times(engine)
    residual = [abs(model.predict(x) - y) / y for x, y in zip(xs, ys)]
    print_table([{k: v for k, v in model.__dict__.items() if k != "source"}], "fitted step-time model (seconds)")
    model.save(args.out)
    trace = loaders.load("mooncake_conversation_trace.jsonl", args.validate)
    scale = TraceScale(block_tokens=EngineConfig.block_size, time_scale=args.time_scale, max_output_tokens=64)
    engine.pool.reset_prefix_cache()  # the check starts cold, like the simulated worker
    real = run_real(engine, trace, scale, check_clock)
    sim = run_sim(trace, scale, model, engine)
    rows = compare(real, sim)
    print_table(
        rows,
        f"simulator vs real engine: first {args.validate} conversation-trace requests "
        f"(scale 1/32, time scale {args.time_scale})",
    )
    emit(
        {
            "model": model.__dict__,
            "fit_steps": len(ys),
            "fit_median_abs_rel_error": percentile(residual, 50),
            "validation": rows,
            "cpu_share": {"fit": fit_clock.cpu_share, "check": check_clock.cpu_share},
            "thread_share": {"fit": fit_clock.thread_share, "check": check_clock.thread_share},
            "settings": vars(args),
        },
        args.out.replace(".json", "_report.json"),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
