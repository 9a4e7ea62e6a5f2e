"""Import names on a fresh machine, exactly as the README's test command runs (`python -m pytest` from the
repository root, which puts the root on sys.path): our Triton kernels are `disagg_kernels`, so Hugging Face's
`kernels` package - imported by transformers - is never shadowed by the repository's `kernels/` folder."""
import importlib
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_root_is_on_sys_path_as_under_the_readme_command():
    # the condition that made `kernels/` shadow Hugging Face's package: keep testing under it
    assert any(Path(p or ".").resolve() == ROOT for p in sys.path)


def test_our_kernels_have_a_unique_import_name():
    kernels = importlib.import_module("disagg_kernels.paged_attention")
    assert Path(kernels.__file__).resolve().is_relative_to(ROOT / "kernels")
    assert not (ROOT / "kernels" / "__init__.py").exists()  # the folder is no package named `kernels`


def test_hugging_face_kernels_and_transformers_hub_kernels_import():
    # installed by the test extras (pyproject.toml) precisely so that this is checked
    importlib.metadata.version("kernels")
    hf_kernels = importlib.import_module("kernels")
    assert hf_kernels.__file__ is not None  # a regular package, not our folder as a namespace portion
    assert not Path(hf_kernels.__file__).resolve().is_relative_to(ROOT / "kernels")
    importlib.import_module("transformers.integrations.hub_kernels")


def test_a_model_builds_through_transformers(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()
