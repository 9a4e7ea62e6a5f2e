"""Models loaded and unloaded at run time on Ray (`/admin/models`, http/admin_models.py): the router's
`ModelLoader`.

`load` checks the entry against the cluster's worker settings (the command line's, sent to the router as
`RouterConfig.worker_template`), starts the model's pools as named actors (cluster/pools.py: `LocalCluster`,
their names prefixed by the model's id; a vision-language model's `encode` encoder workers too, whose images then go
to them), and builds its routing core (cluster/router_service.py: `serve_model`).
A worker that refuses to start (the memory budget, a corrupt or incompatible directory) fails the load with its
reason, and the workers already started for it are ended.  `unload` ends a model's workers and encoder workers,
whether the deployment started them or a load did.

Runs in the router actor's process.  The workers it starts are detached actors, so a router that dies does not
take them with it: after each change of the model table the loader saves what a restarted router needs
(`remember`: cluster/runtime_table.py), and the restarted router serves those models again over the same workers
(`restore`), with the adapters and aliases as they were.  Imports no torch: the actors' classes load the engine
in their own processes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ray

from disagg.cluster.encoder import RayEncoderPort
from disagg.cluster.handles import RayWorkerHandle
from disagg.cluster.pools import ClusterConfig, LocalCluster
from disagg.cluster.router_service import ModelRoute, RouterConfig, max_position_embeddings, serve_model
from disagg.cluster.runtime_table import TableStore, end_named, read_table, restore_table, runtime_prefix, snapshot
from disagg.cluster.worker_config import WorkerConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.http.models import ModelTable, ServedModel
from disagg.model_store import default_model_dir
from disagg.models.deployment import DeploymentError, ModelEntry, ModelSpec, model_spec
from disagg.protocol import LoRARef
from disagg.vision.stage import EncoderPort

log = logging.getLogger(__name__)


class RayModelLoader:
    def __init__(self, config: RouterConfig, template: WorkerConfig, store: TableStore | None = None) -> None:
        """`store`: where the table's run-time changes are kept for a restarted router (None: not kept)."""
        self.config, self.template, self.store = config, template, store
        self.clusters: dict[str, LocalCluster] = {}  # the pools this loader started, by model id
        self.routes: dict[str, ModelRoute] = {}  # the models loaded at run time (a restarted router's too)

    def load(self, entry: ModelEntry, namespace: str) -> tuple[ServedModel, tuple[LoRARef, ...]]:
        spec = model_spec(entry, self.template.engine)  # the entry, its engine settings and its adapters, checked
        model_dir = Path(spec.path or default_model_dir())
        try:  # what the router reads of it, before any worker starts
            Tokenizer.from_dir(model_dir)
            max_position_embeddings(model_dir)
        except (OSError, ValueError) as exc:
            raise DeploymentError(f"{spec.id}: the router cannot read its tokenizer or config ({exc})") from None
        try:
            pools = dataclasses.replace(ClusterConfig.from_template(self.template, spec), detached=True)
            cluster = LocalCluster(pools, spec.worker_prefix, actor_prefix=runtime_prefix(self.config.runtime_key))
        except ray.exceptions.RayError as exc:  # a worker's constructor refused (its message says why)
            raise DeploymentError(f"the workers of {spec.id} did not start: {_reason(exc)}") from None
        try:
            route = route_of(spec, cluster, namespace)
            node = ray.get_runtime_context().get_node_id()
            handles = {n: RayWorkerHandle(n, actor, node) for n, actor in cluster.workers_by_name.items()}
            served = serve_model(self.config, route, handles, handles, encoder_ports(cluster.encoders_by_name))
        except BaseException:  # its workers never outlive a load that failed
            cluster.shutdown()
            raise
        self.clusters[spec.id] = cluster
        self.routes[spec.id] = route
        return served, spec.adapters

    def unload(self, model: ServedModel) -> None:
        self.routes.pop(model.name, None)
        cluster = self.clusters.pop(model.name, None)
        if cluster is not None:
            cluster.shutdown()
            return
        # started with the deployment: ended by name (once: a prefill worker may be an encoder too)
        for name in dict.fromkeys([*model.core.handles, *model.encoders()]):
            try:
                ray.kill(ray.get_actor(name), no_restart=True)
            except ValueError:  # already gone
                log.info("unload %s: worker %s was already gone", model.name, name)

    def remember(self, models: ModelTable) -> None:
        if self.store is None:
            return
        try:  # the change is made: a store that cannot take it is logged, not the caller's error
            self.store.save(snapshot(models, dict(self.routes)).to_wire())
        except (ray.exceptions.RayError, OSError, RuntimeError) as exc:
            log.error("the model table's run-time changes were not saved (a restarted router misses them): %s", exc)

    def restore(self, models: ModelTable) -> None:
        state = read_table(self.store) if self.store is not None else None
        if state is not None:
            restore_table(models, state, self._serve_again)
        # the run-time workers of no model served again - a load the router died in the middle of, a model whose
        # decode workers are gone or that could not be rebuilt: nothing else would ever end them
        kept = {n for route in self.routes.values() for n in [*route.prefill, *route.decode, *route.encoders]}
        end_named(runtime_prefix(self.config.runtime_key), keep=kept)

    def _serve_again(self, route: ModelRoute) -> ServedModel | None:
        """A model loaded by the router's previous life, over the workers of it that are still there."""
        node = ray.get_runtime_context().get_node_id()
        handles = {n: RayWorkerHandle(n, actor, node) for n, actor in alive([*route.prefill, *route.decode]).items()}
        if not any(n in handles for n in route.decode):  # its prefill workers alone serve nothing (`restore` ends them)
            return None
        try:
            served = serve_model(self.config, route, handles, handles, encoder_ports(alive(route.encoders)))
        except Exception as exc:  # whatever it is (a directory gone, a tokenizer the library cannot
            # parse), one model must not keep the router from starting: Ray would restart it into the same error
            log.error("model %s loaded at run time is not served again (its workers end): %s", route.name, exc)
            return None
        self.routes[route.name] = route
        return served


def _reason(exc: ray.exceptions.RayError) -> str:
    """The first line of the worker's own error, not Ray's wrapping of it."""
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__


def route_of(spec: ModelSpec, cluster: LocalCluster, namespace: str) -> ModelRoute:
    """How the router serves the model whose pools `cluster` are: its engines' block size and context, its workers
    (standby and encoders too), its block hashes under `namespace` ("": unsalted)."""
    engine = cluster.config.engine
    return ModelRoute(
        spec.id,
        engine.model,
        engine.block_size,
        engine.max_model_len,
        list(cluster.prefill_by_name),
        list(cluster.decode_by_name),
        namespace,
        standby=cluster.standby,
        encoders=list(cluster.encoders_by_name),
    )


def encoder_ports(actors: dict[str, Any]) -> dict[str, EncoderPort]:
    """Encoder workers' actors, by name, as the encode stage's ports."""
    return {name: RayEncoderPort(name, actor) for name, actor in actors.items()}


def alive(names: list[str]) -> dict[str, Any]:
    """The named workers that exist: a restarted router's arguments still name the workers of a model unloaded since
    (their model is then not served again; cluster/router_service.py)."""
    found = {}
    for name in names:
        try:
            found[name] = ray.get_actor(name)
        except ValueError:  # killed for good by an unload
            continue
    return found
