"""The native kernels' test builds, one per CPU path (AVX-512 as this machine has it, AVX2, portable): shared by
the kernel tests so each skips the same way where a path cannot be built or run here."""

from pathlib import Path

import pytest

from disagg_kernels import native_build
from disagg_kernels.cpu_quant import NativeKernels, load_native

FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def native_for(kernel_builds: Path, march: str = "native") -> NativeKernels:
    """The kernels built for `march` (skips where this machine cannot build or run them)."""
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine (the torch path serves)")
    if march == "haswell" and " avx2" not in FLAGS:
        pytest.skip("this CPU has no AVX2")
    native, why = load_native(kernel_builds, march)
    assert native is not None, why
    return native
