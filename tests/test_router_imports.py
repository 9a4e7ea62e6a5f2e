"""The router process serves HTTP and routes; it loads no model: importing what the router actor imports (its
module, the composition root, the front door, the routing core, and the workers' actor module, which Ray imports
to build their handles) must not import torch or triton.  Checked in
a fresh interpreter, so nothing this test session imported earlier hides a leak."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, pkgutil, sys
import disagg.cluster.router_actor, disagg.cluster.router_service, disagg.http, disagg.router, disagg.planner
import disagg.cluster.actors, disagg.cluster.launch  # Ray imports the workers' actor module to build handles
for pkg in (disagg.http, disagg.router, disagg.planner):
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
print(sorted(m for m in ("torch", "triton") if m in sys.modules))
"""


def test_the_router_process_imports_no_torch_and_no_triton():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
