"""The models one front door serves: a request's `model` names one, and everything about serving it - its routing
core (own pools, KV index, admission, health, planner), tokenizer, context length and block-hash namespace - comes
from that entry.  `/v1/models` lists them; an unknown name is a 404 `model_not_found` in every API.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from disagg.engine.tokenizer import Tokenizer
from disagg.errors import InvalidRequest, NotFound
from disagg.router.router import RouterCore


@dataclass
class ServedModel:
    name: str  # what a request's `model` says
    core: RouterCore
    tokenizer: Tokenizer
    max_model_len: int
    namespace: str = ""  # block-hash namespace (isolation.model_salted); "": a single-model deployment

    def card(self) -> dict[str, object]:
        """Its /v1/models entry."""
        return {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "disagg",
            "max_model_len": self.max_model_len,
        }


class ModelTable:
    """The served models by name, in the order they were declared (the first is the default for tools)."""

    def __init__(self, models: list[ServedModel]) -> None:
        if not models:
            raise ValueError("a front door serves at least one model")
        self._by_name = {m.name: m for m in models}
        if len(self._by_name) != len(models):
            raise ValueError("model names must be unique")

    @classmethod
    def single(cls, name: str, core: RouterCore, tokenizer: Tokenizer, max_model_len: int) -> ModelTable:
        return cls([ServedModel(name, core, tokenizer, max_model_len)])

    def get(self, name: str) -> ServedModel:
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found") from None

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def cores(self) -> list[RouterCore]:
        return [m.core for m in self]

    def core_of_worker(self, worker: str) -> RouterCore:
        """The core whose pools hold `worker` (admin calls name workers, not models)."""
        for model in self:
            if worker in model.core.health.workers:
                return model.core
        raise InvalidRequest(f"no worker named {worker!r}", param="worker")  # as RoleChanger.validate says it
