"""A deployment of several models behind one router: which models, from where, on how many workers, with which
engine settings (pure: no Ray, no HTTP, no torch).

Read from one file (`disagg serve --deployment FILE`: TOML, YAML or JSON, by its extension):

    [[models]]
    id = "smollm"            # what a request's `model` names; also /v1/models' id
    path = ""                # HF model directory (or one holding a GGUF); "": the default model
    prefill = 1              # prefill workers (0: aggregated workers)
    decode = 1               # decode (or aggregated) workers
    standby = 0              # more decode workers, started asleep: the fleet planner wakes them (--fleet-planner)
    encode = 0               # encoder workers for a vision-language model's images (E/PD; 0: colocated)
    aliases = ["chat"]       # other names for it (more, with weights, at run time: /admin/aliases)
    [models.engine]          # EngineConfig fields for this model's workers, over the command line's
    kv_cache_memory_mb = 256
    [models.adapters]        # LoRA adapters (PEFT directories) of this model, each served under its own name
    smollm-sql = "/adapters/sql"

    [[models]]
    id = "coder"
    path = "/models/tiny-coder"
    prefill = 0
    decode = 1

Every bad field is refused before anything starts, with its place in the file (`models[1].decode: ...`).  Each
model gets its own prefill/decode pools and its own routing core (index, admission, health, planner); with more
than one model, every block hash is also salted with the model's id (isolation.py), so no cached prefix of one
model can ever match another's, even where their tiers or pools meet.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from disagg.config import EngineConfig
from disagg.errors import InvalidRequest
from disagg.model_store import default_model_dir
from disagg.models.adapters import AdapterError, check_adapter
from disagg.protocol import LoRARef
from disagg.vision.spec import VisionSpec

# ids are what clients send as `model`; names like "coder@2" or "org/model" are common
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$")
_WORKER_PREFIX_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# set by the deployment itself, not by a model's engine table
_NOT_PER_MODEL = ("model", "faults")
MAX_WORKERS_PER_ROLE = 1024  # a typo's guard (decode = 10000), far above any one cluster's size


class DeploymentError(InvalidRequest):
    """A deployment (or a model entry sent to /admin/models) that cannot be served, with every problem named by its
    place (a 400 where a request meets it)."""


class ModelEntry(BaseModel):
    """One `[[models]]` entry as written in the file."""

    model_config = ConfigDict(extra="forbid")

    id: str
    path: str = ""
    prefill: int = Field(default=1, ge=0, le=MAX_WORKERS_PER_ROLE)
    decode: int = Field(default=1, ge=1, le=MAX_WORKERS_PER_ROLE)
    # decode workers started with the model's weights, then parked asleep (router/parking.py): the fleet planner
    # (planner/fleet.py) wakes one when this model needs it, and parks another model's worker in its place
    standby: int = Field(default=0, ge=0, le=MAX_WORKERS_PER_ROLE)
    encode: int = Field(default=0, ge=0, le=MAX_WORKERS_PER_ROLE)  # encoder workers (a VLM's images: E/PD)
    # of its prefill workers, how many also encode the images of requests prefilled elsewhere (E/PD without a
    # worker of its own: that core prefills text when images are rare)
    encode_on_prefill: int = Field(default=0, ge=0, le=MAX_WORKERS_PER_ROLE)
    engine: dict[str, Any] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)  # names that send all their requests here (models/aliases.py)
    adapters: dict[str, str] = Field(default_factory=dict)  # LoRA name -> PEFT directory, served as models

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("must start with a letter or digit and hold only letters, digits and . _ : @ / + -")
        return value


class DeploymentFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a deployment, checked: its served id, its directory ("" = the default model), its pools and
    its workers' engine settings."""

    id: str
    path: str
    prefill: int
    decode: int
    engine: EngineConfig
    aliases: tuple[str, ...] = ()
    adapters: tuple[LoRARef, ...] = ()  # each with its absolute directory and its files' digest
    standby: int = 0  # decode workers started asleep (ModelEntry.standby)
    encode: int = 0  # encoder workers of this model's images (ModelEntry.encode)
    encode_on_prefill: int = 0  # prefill workers that also encode for the others (ModelEntry.encode_on_prefill)

    @property
    def worker_prefix(self) -> str:
        """What this model's worker (Ray actor) names and tier directories start with."""
        return _WORKER_PREFIX_UNSAFE.sub("_", self.id) + "-"


@dataclasses.dataclass(frozen=True)
class Deployment:
    models: tuple[ModelSpec, ...]

    @property
    def namespaced(self) -> bool:
        """Whether block hashes carry the model: with one model there is nothing to keep apart, and its hashes stay
        exactly those of a single-model cluster."""
        return len(self.models) > 1

    def ids(self) -> list[str]:
        return [m.id for m in self.models]


def _engine_overrides(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A model's engine table checked field by field against EngineConfig's types."""
    hints = typing.get_type_hints(EngineConfig)
    fields = {f.name for f in dataclasses.fields(EngineConfig)} - set(_NOT_PER_MODEL)
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in table.items():
        if key not in fields:
            problems.append(f"{where}.{key}: not an engine setting (one of: {', '.join(sorted(fields))})")
            continue
        try:
            out[key] = TypeAdapter(hints[key]).validate_python(value, strict=True)
        except ValidationError as exc:
            problems.append(f"{where}.{key}: {exc.errors()[0]['msg']} (got {value!r})")
    if problems:
        raise DeploymentError("\n".join(problems))
    return out


def _check_path(path: str, where: str) -> None:
    if not path:
        return
    directory = Path(path)
    if not directory.is_dir():
        raise DeploymentError(f"{where}.path: {path} is not a directory")
    if not (directory / "config.json").exists() and not any(directory.glob("*.gguf")):
        raise DeploymentError(f"{where}.path: {path} holds no config.json and no GGUF file: not a model directory")


def deployment_of(data: object, base: EngineConfig | None = None) -> Deployment:
    """A checked Deployment from the file's parsed content; `base`: the engine settings every model starts from
    (the command line's)."""
    try:
        parsed = DeploymentFile.model_validate(data)
    except ValidationError as exc:
        raise DeploymentError(
            "\n".join(f"{_place(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        ) from None
    seen: set[str] = set()
    specs: list[ModelSpec] = []
    for i, entry in enumerate(parsed.models):
        where = f"models[{i}]"
        for name in (entry.id, *entry.aliases, *entry.adapters):
            if name in seen:
                raise DeploymentError(f"{where}: {name!r} is served twice (as a model id or an alias)")
            seen.add(name)
        specs.append(model_spec(entry, base, where))
    prefixes = [s.worker_prefix for s in specs]
    if len(set(prefixes)) != len(prefixes):
        raise DeploymentError("two model ids map to the same worker names; make them differ in letters or digits")
    return Deployment(tuple(specs))


def check_name(name: str) -> None:
    """DeploymentError unless `name` can be a served model's name."""
    if not _ID.match(name):
        raise DeploymentError(f"{name!r} is not a model name (letters, digits and . _ : @ / + -)")


def model_spec(entry: ModelEntry, base: EngineConfig | None = None, where: str = "model") -> ModelSpec:
    """One entry checked (its path, its engine settings over `base`); DeploymentError names what is wrong."""
    _check_path(entry.path, where)
    overrides = _engine_overrides(entry.engine, f"{where}.engine")
    try:
        engine = dataclasses.replace(base or EngineConfig(), model=entry.path, **overrides)
    except ValueError as exc:  # EngineConfig's own checks (ranges, modes)
        raise DeploymentError(f"{where}.engine: {exc}") from None
    for kind, names in (("aliases", entry.aliases), ("adapters", list(entry.adapters))):
        for name in names:
            if not _ID.match(name):
                raise DeploymentError(f"{where}.{kind}: {name!r} is not a model name")
    if entry.standby and (engine.device == "cuda" or not sys.platform.startswith("linux")):
        # standby workers sleep (engine/sleep.py: host pages given back, Linux only); a worker on "auto" that
        # lands on a GPU refuses at start, with the same reason
        raise DeploymentError(f"{where}.standby: standby workers sleep, and sleep needs CPU workers on Linux")
    for kind, n in (("encode", entry.encode), ("encode_on_prefill", entry.encode_on_prefill)):
        if n and VisionSpec.from_dir(entry.path or default_model_dir()) is None:
            raise DeploymentError(f"{where}.{kind}: {entry.path or 'the default model'} is not a vision-language model")
    if entry.encode_on_prefill > entry.prefill:
        raise DeploymentError(f"{where}.encode_on_prefill: more than its {entry.prefill} prefill workers")
    if entry.adapters and engine.max_loras <= 0:
        raise DeploymentError(f"{where}.adapters: its workers serve no adapters (engine.max_loras is 0)")
    adapters = []
    for name, adapter in entry.adapters.items():
        path = str(Path(adapter).resolve())  # the workers read it, wherever they were started
        try:
            digest = check_adapter(path, entry.path or default_model_dir())
        except AdapterError as exc:
            raise DeploymentError(f"{where}.adapters.{name}: {exc.message}") from None
        adapters.append(LoRARef(name, path, digest))
    return ModelSpec(
        entry.id,
        entry.path,
        entry.prefill,
        entry.decode,
        engine,
        tuple(entry.aliases),
        tuple(adapters),
        entry.standby,
        entry.encode,
        entry.encode_on_prefill,
    )


def _place(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def load_deployment(path: str | Path, base: EngineConfig | None = None) -> Deployment:
    """Read and check a deployment file (.toml, .yaml / .yml or .json)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeploymentError(f"cannot read the deployment file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data: object = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise DeploymentError(f"{path}: a deployment file is .toml, .yaml, .yml or .json")
    except (ValueError, yaml.YAMLError) as exc:  # tomllib's and json's errors are ValueErrors
        if isinstance(exc, DeploymentError):
            raise
        raise DeploymentError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    return deployment_of(data, base)
