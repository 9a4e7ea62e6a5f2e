"""Triton attention kernels, each with its torch reference: paged decode and prefix prefill.

The import name is `disagg_kernels`, not `kernels`: Hugging Face ships a package named `kernels` that transformers
imports, and a top-level folder of that name on `sys.path` (the repository root under `python -m pytest`) shadowed
it. The folder `kernels/` itself has no `__init__.py`, so it can never be imported as a package of that name.
"""
