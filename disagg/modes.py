"""The engine's modes as enums, importable without torch: the configs validate against them (disagg/config.py)
and the engine's modules act on them.  One list of names per option, so a CLI's help, its validation and the
code that runs each mode cannot disagree."""

from __future__ import annotations

import enum
from typing import TypeVar

_E = TypeVar("_E", bound=enum.Enum)


class Quantization(enum.Enum):
    """Weights (`--quantization`): disagg/engine/quant.py."""

    NONE = "none"
    INT8 = "int8"
    Q4 = "q4"


class Activations(enum.Enum):
    """What quantized weights multiply (`--quant-activations`): disagg/engine/quant.py."""

    FLOAT32 = "float32"  # exact: the same model as float32 weights would be, up to summation order
    INT16 = "int16"  # rounded per block of 32 to 16 bits, integer dot products: float32's error, faster
    INT8 = "int8"  # rounded per block of 32 to 8 bits (llama.cpp's Q8 activations): lossy, fastest

    @property
    def bits(self) -> int:
        """0 for float32, else the integer width the block kernels round activations to."""
        return {"float32": 0, "int16": 16, "int8": 8}[self.value]


class KVDtype(enum.Enum):
    """The KV cache's element format (`--kv-dtype`): disagg/engine/kv_format.py."""

    AUTO = "auto"  # the model's compute dtype
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"
    FP8 = "fp8"

    @property
    def quantized(self) -> bool:
        return self in (KVDtype.INT8, KVDtype.FP8)


class SpecMethod(enum.Enum):
    """Speculative decoding (`--speculative`): disagg/engine/spec.py."""

    NONE = "none"
    NGRAM = "ngram"


def parse_mode(kind: type[_E], value: str, option: str) -> _E:
    """`kind(value)`, or a ValueError naming the option and its choices."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{option} {value!r} is not one of {[m.value for m in kind]}") from None
