"""Compiling a C++ source of this package into a shared library for the machine that runs it (torch-free: the
router process builds its prefix index with it and loads no torch).

The build is cached under a key of the sources (and the headers they include), the compiler, its flags and the
CPU's flags, so a machine with another CPU (or compiler) builds its own copy; concurrent builders of one key all
end with one library (the file is moved into place atomically).  A missing compiler or a failed build raises
RuntimeError with the compiler's message: each caller falls back to its Python or torch path and says why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_BUILD_TIMEOUT_S = 300


def cpu_flags() -> str:
    """The running CPU's feature line (part of every build key)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


def build_library(
    name: str, sources: tuple[Path, ...], flags: list[str], cache_dir: Path, headers: tuple[Path, ...] = ()
) -> Path:
    """`sources` compiled with `flags` into `cache_dir/<name>-<key>.so` (once per key); the library's path.
    `headers` are the ones the sources include from this package: their text is part of the key, so a changed
    header builds a new library instead of loading one compiled from the old text."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    texts = [src.read_text() for src in (*sources, *headers)]
    key = hashlib.sha256("\0".join([*texts, cxx, version, cpu_flags(), *flags]).encode()).hexdigest()
    target = cache_dir / f"{name}-{key[:16]}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run(
            [cxx, *flags, *map(str, sources), "-o", str(out)], capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S
        )
        if proc.returncode != 0:
            names = " ".join(src.name for src in sources)
            raise RuntimeError(f"{cxx} failed on {names}: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent workers building the same key all end with one library
    return target
