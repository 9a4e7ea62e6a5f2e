"""The models one front door serves: a request's `model` names one (or an alias of some: models/aliases.py), and
everything about serving it - its routing core (own pools, KV index, admission, health, planner), tokenizer,
context length and block-hash namespace - comes from that entry.  `/v1/models` lists them; an unknown name is a
404 `model_not_found` in every API, a model being unloaded a 503 `model_unavailable` with Retry-After.

Lifecycle of a model loaded at run time (http/admin_models.py drives it through a `ModelLoader`):
LOADING (its id reserved: a second load of it is a 409) -> SERVING -> DRAINING (new requests refused, the ones in
flight finish) -> gone (its core stopped, its workers ended).  A model can sleep meanwhile (http/admin_sleep.py):
SERVING -> SLEEPING (new requests refused, the ones in flight finish, then its workers give their KV memory back)
-> WAKING -> SERVING.  An adapter takes requests only while its base does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from disagg.engine.tokenizer import Tokenizer
from disagg.errors import Conflict, InvalidRequest, ModelUnavailable, NotFound
from disagg.models.aliases import AliasTable
from disagg.models.deployment import ModelEntry
from disagg.protocol import LoRARef
from disagg.router.router import RouterCore
from disagg.vision.spec import VisionSpec
from disagg.vision.stage import EncodeStage

UNAVAILABLE_RETRY_AFTER_S = (
    1.0  # a model being unloaded, asleep or waking: an alias may point elsewhere by then, or it is awake
)


def _uniform(key: str) -> float:
    """A number in [0, 1) fixed by `key`."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


class ModelState(str, enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # being unloaded
    SLEEPING = "sleeping"  # going to sleep, or asleep
    WAKING = "waking"


_REFUSALS = {  # a request for a model in this state: 503 model_unavailable, saying why
    ModelState.DRAINING: "is being unloaded",
    ModelState.SLEEPING: "is asleep; an operator wakes it (POST /admin/models/{id}/wake)",
    ModelState.WAKING: "is waking up",
}


@dataclass
class ServedModel:
    name: str  # what a request's `model` says
    core: RouterCore
    tokenizer: Tokenizer
    max_model_len: int
    namespace: str = ""  # block-hash namespace (isolation.model_salted); "": a single-model deployment
    state: ModelState = ModelState.SERVING
    lora: LoRARef | None = None  # a LoRA adapter of `parent`, served as a model of its own (same core)
    parent: str | None = None
    model_dir: str = ""  # the base model's directory (adapters are checked against its config.json)
    vision: VisionSpec | None = None  # a vision-language model's image token and tokens per image; None: text only
    encode: EncodeStage | None = None  # a VLM's encoder stage (E/PD: vision/stage.py); None: images colocated

    def card(self) -> dict[str, object]:
        """Its /v1/models entry (an adapter's names its `parent` and its directory, as vLLM's do)."""
        card: dict[str, object] = {"id": self.name, "object": "model", "created": 0, "owned_by": "disagg"}
        card["max_model_len"] = self.max_model_len
        if self.lora is not None:
            card.update(parent=self.parent, root=self.lora.path)
        return card

    def adapter(self, ref: LoRARef) -> ServedModel:
        """This model with a LoRA adapter, served as the adapter's name (its requests carry the adapter)."""
        return dataclasses.replace(self, name=ref.name, lora=ref, parent=self.name)

    def encoders(self) -> list[str]:
        """The names of what encodes its images (E/PD): encoder workers, and prefill workers that encode for the others
        (--encode-on-prefill); none: its images are encoded colocated, or it takes none."""
        return list(self.encode.ports) if self.encode is not None else []

    def in_flight(self) -> int:
        """Requests admitted to its core and not finished (queued or running)."""
        queued = sum(self.core.admission.queue.depth().values())
        return queued + sum(load.active_requests for load in self.core.loads.values())


class ModelLoader(Protocol):
    """Brings a model's workers up or down at run time (the cluster implements it: cluster/model_loader.py).
    Both calls block (the admin routes run them off the event loop)."""

    def load(self, entry: ModelEntry, namespace: str) -> tuple[ServedModel, tuple[LoRARef, ...]]:
        """Start `entry`'s workers and build its routing core (not started), its block hashes under `namespace`;
        with its adapters, checked.  DeploymentError if the entry is bad or its workers cannot run."""
        ...

    def unload(self, model: ServedModel) -> None:
        """End the workers of a model whose core has stopped."""
        ...

    def remember(self, models: ModelTable) -> None:
        """Keep the table's run-time changes (models loaded, adapters, aliases) for a restarted router."""
        ...

    def restore(self, models: ModelTable) -> None:
        """Bring back into `models` (a restarted router's deployment) what `remember` kept."""
        ...


class ModelTable:
    """The served models by name, in the order they were declared or loaded, and the aliases over them."""

    def __init__(self, models: list[ServedModel], draw: Callable[[], float] = random.random) -> None:
        if not models:
            raise ValueError("a front door serves at least one model")
        self._by_name = {m.name: m for m in models}
        if len(self._by_name) != len(models):
            raise ValueError("model names must be unique")
        self.aliases = AliasTable()
        self.loading: set[str] = set()  # ids reserved by a load in progress
        self.changing: set[str] = set()  # models an unload, sleep or wake is under way for
        self._draw = draw

    @classmethod
    def single(cls, name: str, core: RouterCore, tokenizer: Tokenizer, max_model_len: int) -> ModelTable:
        return cls([ServedModel(name, core, tokenizer, max_model_len)])

    def get(self, name: str, stick: str | None = None) -> ServedModel:
        """The model `name` names - itself, or one of an alias's targets drawn by weight - if it takes requests.
        `stick`: a key whose every request draws the same target (an Idempotency-Key: its repeats find its answer)."""
        model = self.pick(name, stick)
        self.check(model)
        return model

    def pick(self, name: str, stick: str | None = None) -> ServedModel:
        """The model `name` names (itself, or an alias's target drawn as `get` draws it), whatever its state."""
        route = self.aliases.get(name)
        draw = self._draw() if stick is None else _uniform(stick)
        model = self._by_name.get(route.pick(draw) if route is not None else name)
        if model is None:
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return model

    def base_of(self, model: ServedModel) -> ServedModel:
        """The model whose core serves `model`: itself, or an adapter's base."""
        return self._by_name.get(model.parent, model) if model.parent is not None else model

    def check(self, model: ServedModel) -> None:
        """ModelUnavailable (503, Retry-After) unless `model` and its base take requests."""
        for m in (model, self.base_of(model)):
            if m.state is not ModelState.SERVING:
                why = _REFUSALS[m.state].format(id=m.name)
                raise ModelUnavailable(f"The model `{m.name}` {why}.", retry_after_s=UNAVAILABLE_RETRY_AFTER_S)

    def serving(self, name: str) -> ServedModel:
        """The base model with id `name` if it takes requests (409 while it drains; 400 for an adapter)."""
        model = self.served(name)
        if model.lora is not None:
            raise InvalidRequest(f"{name} is an adapter; an adapter's base is a model", param="model")
        if model.state is not ModelState.SERVING:
            raise Conflict(f"{name} {_REFUSALS[model.state].format(id=name)}")
        return model

    @contextlib.contextmanager
    def change(self, name: str) -> Iterator[None]:
        """One unload, sleep or wake of model `name` at a time (409 while another runs)."""
        if name in self.changing:
            raise Conflict(f"{name} is being changed by another call; try again when it ends")
        self.changing.add(name)
        try:
            yield
        finally:
            self.changing.discard(name)

    def serving_ids(self) -> set[str]:
        """The ids requests may name (what an alias may point at): every model not being unloaded - an asleep one
        answers 503, or wakes on the request (http/idle.py)."""
        return {m.name for m in self if m.state is not ModelState.DRAINING}

    def served(self, name: str) -> ServedModel:
        """The model with id `name`, whatever its state (admin calls)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found") from None

    def check_free(self, name: str) -> None:
        """409 if `name` is served, loading or an alias."""
        if name in self._by_name or name in self.loading or self.aliases.get(name) is not None:
            raise Conflict(f"a model or alias named {name!r} is already served or loading", param="id")

    def cards(self) -> list[dict[str, object]]:
        """/v1/models: the models, then the aliases (each naming its targets)."""
        aliases = [
            {"id": alias, "object": "model", "created": 0, "owned_by": "disagg", "alias_of": route.as_dict()}
            for alias, route in self.aliases.items()
        ]
        return [m.card() for m in self] + aliases

    def add(self, model: ServedModel) -> None:
        self.loading.discard(model.name)
        self._by_name[model.name] = model

    def remove(self, name: str) -> None:
        self._by_name.pop(name, None)

    def ids(self) -> set[str]:
        return set(self._by_name)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def bases(self) -> list[ServedModel]:
        """The models with a core of their own (an adapter shares its base's)."""
        return [m for m in self if m.lora is None]

    def cores(self) -> list[RouterCore]:
        return [m.core for m in self.bases()]

    def adapters_of(self, name: str) -> list[str]:
        """The adapters served over model `name`."""
        return [m.name for m in self if m.parent == name]

    def model_of_worker(self, worker: str) -> ServedModel | None:
        """The base model whose pools hold `worker` (None: no model's)."""
        return next((m for m in self.bases() if worker in m.core.health.workers), None)

    def core_of_worker(self, worker: str) -> RouterCore:
        """The core whose pools hold `worker` (admin calls name workers, not models)."""
        model = self.model_of_worker(worker)
        if model is not None:
            return model.core
        raise InvalidRequest(f"no worker named {worker!r}", param="worker")  # as RoleChanger.validate says it
