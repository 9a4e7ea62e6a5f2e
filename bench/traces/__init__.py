"""Workloads for the bench harness: trace records, loaders (Mooncake JSONL, generic CSV), hash_id -> token ids,
and generated multi-turn agent sessions."""
from bench.traces.record import TraceRequest, TraceScale

__all__ = ["TraceRequest", "TraceScale"]
