"""E/PD against colocated image encoding on a real cluster at equal workers: TTFT of image-heavy and image-light
traffic (chat completions with data-URL images, open-loop Poisson arrivals, streamed).

Arms, three single-thread workers each: `epd` = 1 encoder + 1 prefill + 1 decode (`--encode 1`), `epd-shared` =
2 prefill + 1 decode of which the first prefill worker also encodes every request's images on a thread of its own
(`--encode-on-prefill 1`), `colocated` = 2 prefill + 1 decode (each prefill worker encodes its own requests'
images, on its engine thread).  The model is a LLaVA of realistic
size with random weights (no VLM weights are reachable offline): a CLIP ViT-B/16 tower at 224 px (196 image
positions) and a language model of SmolLM2-135M's shape.  Every image is new (no cache helps either arm); the same
requests, arrivals and images go to both arms; repeats are interleaved, each arm first in turn.

    .venv/bin/python -m bench.images --repeats 3 --out bench/results/images.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import emit, median_range, print_table
from bench.dynamo_router import cpu_model
from disagg.model_store import cache_root, default_model_dir
from disagg.options import add_options, from_options


@dataclass
class ImageBenchOptions:
    requests: int = field(default=24, metadata={"help": "requests per workload and run"})
    rate: float = field(default=0.5, metadata={"help": "arrivals per second (Poisson)"})
    heavy_share: float = field(default=1.0, metadata={"help": "requests with an image, image-heavy workload"})
    light_share: float = field(default=0.1, metadata={"help": "requests with an image, image-light workload"})
    text_tokens: int = field(default=200, metadata={"help": "words of a text-only request's prompt"})
    max_tokens: int = field(default=8, metadata={"help": "output tokens per request"})
    repeats: int = field(default=3, metadata={"help": "interleaved runs of each arm"})
    kv_cache_mb: int = field(default=256, metadata={"help": "KV cache per worker (MiB)"})
    arms: str = field(default="epd,epd-shared,colocated", metadata={"help": "the arms to run (colocated: always)"})
    out: str = field(default="", metadata={"help": "write the results as JSON here"})


VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)  # ViT-B/16
TEXT = dict(  # SmolLM2-135M's shape
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
)
# (encoder workers, prefill, decode, prefill workers that encode for the others)
ARMS = {"epd": (1, 1, 1, 0), "epd-shared": (0, 2, 1, 1), "colocated": (0, 2, 1, 0)}


def bench_model() -> Path:
    from disagg.vision.tiny import make_tiny_vlm

    path = cache_root() / "models" / "bench-llava-vitb16-smollm-shape"
    return make_tiny_vlm(path, default_model_dir(), seed=0, image_size=224, patch_size=16, vision=VISION, text=TEXT)


def _png_url(seed: int) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def requests_of(opts: ImageBenchOptions, share: float, seed: int) -> list[tuple[float, list[dict[str, Any]]]]:
    rng = random.Random(seed)
    words = ["river", "stone", "cloud", "lamp", "window", "garden", "engine", "paper", "music", "orange"]
    out, t = [], 0.0
    for i in range(opts.requests):
        t += rng.expovariate(opts.rate)
        if rng.random() < share:
            content: Any = [
                {"type": "text", "text": f"Picture {seed}-{i}: what is in it?"},
                {"type": "image_url", "image_url": {"url": _png_url(seed * 100_003 + i)}},
            ]
        else:
            content = f"Note {seed}-{i}: " + " ".join(rng.choice(words) for _ in range(opts.text_tokens))
        out.append((t, [{"role": "user", "content": content}]))
    return out


async def _one(client: httpx.AsyncClient, model: str, messages: list, max_tokens: int) -> float | None:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return None
        async for line in resp.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                obj = json.loads(line[5:])
                if any((c.get("delta") or {}).get("content") for c in obj.get("choices") or []):
                    return time.perf_counter() - start
    return None


async def run_workload(url: str, model: str, reqs: list, max_tokens: int) -> list[float | None]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()

        async def at(arrival: float, messages: list) -> float | None:
            await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
            return await _one(client, model, messages, max_tokens)

        return await asyncio.gather(*(at(a, m) for a, m in reqs))


def run_arm(arm: str, opts: ImageBenchOptions, model_dir: Path, seed: int) -> dict[str, Any]:
    import ray

    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig

    encoders, prefill, decode, shared = ARMS[arm]
    engine = EngineConfig(model=str(model_dir), kv_cache_memory_mb=opts.kv_cache_mb, num_threads=1)
    cluster = ClusterConfig(
        num_prefill=prefill, num_decode=decode, num_encode=encoders, encode_on_prefill=shared, engine=engine
    )
    svc = Service(cluster, RouterConfig())
    try:
        model = model_dir.name
        asyncio.run(run_workload(svc.url, model, requests_of(opts, 1.0, seed + 7)[:2], 2))  # warm-up
        out: dict[str, Any] = {}
        for name, share in (("image_heavy", opts.heavy_share), ("image_light", opts.light_share)):
            ttfts = asyncio.run(run_workload(svc.url, model, requests_of(opts, share, seed), opts.max_tokens))
            done = [t for t in ttfts if t is not None]
            out[name] = {"ttft_p50_s": statistics.median(done) if done else None, "failed": len(ttfts) - len(done)}
        return out
    finally:
        svc.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.images", description=__doc__.splitlines()[0])
    add_options(parser, ImageBenchOptions)
    opts = from_options(ImageBenchOptions, parser.parse_args(argv))
    named = set(opts.arms.split(","))
    if unknown := named - set(ARMS):  # refused before the model is built
        raise SystemExit(f"--arms: unknown {sorted(unknown)} (known: {list(ARMS)})")
    arms = [a for a in ARMS if a in named | {"colocated"}]
    model_dir = bench_model()
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for r in range(opts.repeats):
        for arm in arms[:: 1 if r % 2 == 0 else -1]:  # first and last in turn
            runs[arm].append(run_arm(arm, opts, model_dir, seed=r + 1))
            print(arm, r, runs[arm][-1], flush=True)
    rows = []
    for name in ("image_heavy", "image_light"):
        colo = [run[name]["ttft_p50_s"] for run in runs["colocated"]]
        row: dict[str, Any] = {"workload": name, "TTFT p50 colocated (s)": median_range(colo)}
        for arm in (a for a in arms if a != "colocated"):
            split = [run[name]["ttft_p50_s"] for run in runs[arm]]
            row[f"TTFT p50 {arm} (s)"] = median_range(split)
            row[f"colocated / {arm}"] = median_range([c / e for e, c in zip(split, colo) if e and c])
        rows.append(row)
    print_table(rows, f"E/PD vs colocated encoding, 3 workers each ({cpu_model()})")
    emit({"benchmark": "images", "cpu": cpu_model(), "options": vars(opts), "runs": runs, "summary": rows}, opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
