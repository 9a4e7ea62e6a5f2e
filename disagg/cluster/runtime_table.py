"""The model table's run-time changes (http/admin_models.py), kept where a restarted router finds them: the models
loaded at run time (their routes: workers and encoder workers by name, block-hash namespace, standby), every base
model's adapters and the aliases with their weights.  Saved after each change in Ray's GCS key-value store under the
router's `RouterConfig.runtime_key`, read back when the router actor starts again - Ray restarts a router that crashed
with the arguments it was first given, which name only the deployment's workers.

The workers of a model loaded at run time are detached actors (cluster/model_loader.py): they outlive the router
that started them, and `Service.shutdown` ends them (`end_runtime_workers`).  Their names start with the router's
key (`runtime_prefix`), so the workers of a load the router died in the middle of - in no saved route - are found
and ended too, by the restarted router and by the shutdown.  A model whose workers are all gone
when the router comes back is not served again, as a deployment model unloaded before it.  A state written by
another version of this message is ignored, loudly: the router then serves its deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import ray
from ray.experimental import internal_kv

from disagg.cluster.router_service import ModelRoute
from disagg.errors import DisaggError, WireFormatError
from disagg.http.models import ModelTable, ServedModel
from disagg.protocol import LoRARef
from disagg.wire import WireMessage

log = logging.getLogger(__name__)

KV_NAMESPACE = "disagg"


@dataclass
class RuntimeTable(WireMessage):
    TYPE: ClassVar[str] = "runtime_table"
    routes: list[ModelRoute] = field(default_factory=list)  # models loaded at run time, in load order
    adapters: dict[str, list[LoRARef]] = field(default_factory=dict)  # base model -> all its adapters
    aliases: dict[str, dict[str, float]] = field(default_factory=dict)  # alias -> target -> weight


class TableStore(Protocol):
    """Where a router keeps its RuntimeTable (bytes) between its lives."""

    def save(self, state: bytes) -> None: ...

    def load(self) -> bytes | None: ...

    def clear(self) -> None: ...


class GcsTableStore:
    """Ray's GCS key-value store: it outlives every actor, and every process of the Ray cluster reads it."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    def save(self, state: bytes) -> None:
        internal_kv._internal_kv_put(self.key, state, overwrite=True, namespace=KV_NAMESPACE)

    def load(self) -> bytes | None:
        return internal_kv._internal_kv_get(self.key, namespace=KV_NAMESPACE)

    def clear(self) -> None:
        internal_kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)


def snapshot(models: ModelTable, routes: dict[str, ModelRoute]) -> RuntimeTable:
    """What a restarted router needs to serve `models` as they are: `routes`, the models loaded at run time."""
    served = models.ids()
    adapters = {
        base.name: [m.lora for m in models if m.parent == base.name and m.lora is not None] for base in models.bases()
    }
    return RuntimeTable(
        routes=[route for name, route in routes.items() if name in served],
        adapters=adapters,
        aliases={alias: route.as_dict() for alias, route in models.aliases.items()},
    )


def restore_table(models: ModelTable, state: RuntimeTable, serve: Callable[[ModelRoute], ServedModel | None]) -> None:
    """Make `models` - the deployment's, as a restarted router built it - what they were: the models loaded at
    run time served again (`serve` builds one's core over its workers; None: they are gone), each base's
    adapters as they were (ones removed stay removed), the aliases as they were."""
    for route in state.routes:
        if route.name in models.ids():
            continue
        served = serve(route)
        if served is None:
            log.warning("model %s loaded at run time: its workers are gone, not served again", route.name)
            continue
        models.add(served)
    for base in models.bases():
        if base.name not in state.adapters:
            continue  # not in the saved table (a model loaded since it was written): as it is
        wanted = {ref.name: ref for ref in state.adapters[base.name]}
        for name in models.adapters_of(base.name):
            if name not in wanted:
                models.remove(name)
        for ref in wanted.values():
            if ref.name not in models.ids():
                models.add(base.adapter(ref))
    for alias, _ in models.aliases.items():
        models.aliases.remove(alias)
    for alias, targets in state.aliases.items():
        try:
            models.aliases.set(alias, targets, models.serving_ids())
        except DisaggError as exc:  # a target not served again
            log.warning("alias %s not restored: %s", alias, exc)


def read_table(store: TableStore) -> RuntimeTable | None:
    raw = store.load()
    if raw is None:
        return None
    try:
        return RuntimeTable.from_wire(raw)
    except WireFormatError as exc:
        log.error("the saved model table is unreadable (%s): serving the deployment alone", exc)
        return None


def runtime_prefix(key: str) -> str:
    """What the names of a router's run-time workers start with ("" when its table is not kept)."""
    return f"{key}-" if key else ""


def end_named(prefix: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """End every actor of this namespace whose name starts with `prefix`, but those in `keep` ("": none)."""
    if not prefix:
        return
    for name in ray.util.list_named_actors():
        if isinstance(name, str) and name.startswith(prefix) and name not in keep:
            try:
                ray.kill(ray.get_actor(name), no_restart=True)
            except ValueError:  # gone meanwhile
                continue


def end_runtime_workers(store: TableStore, key: str) -> None:
    """End the workers of the models loaded at run time (detached: nothing else ends them) - every one is named
    under the key, so the saved table's and any of a load still under way alike - and forget them."""
    end_named(runtime_prefix(key))
    store.clear()
