"""Benchmarks and the bench harness.  Benchmarks send traffic to loopback only: UCX stays on `lo` unless the
caller set UCX_NET_DEVICES (Ray workers started from here inherit it)."""

import os

os.environ.setdefault("UCX_NET_DEVICES", "lo")
