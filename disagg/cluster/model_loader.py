"""Models loaded and unloaded at run time on Ray (`/admin/models`, http/admin_models.py): the router's
`ModelLoader`.

`load` checks the entry against the cluster's worker settings (the command line's, sent to the router as
`RouterConfig.worker_template`), starts the model's pools as named actors (cluster/pools.py: `LocalCluster`,
their names prefixed by the model's id), and builds its routing core (cluster/router_service.py: `serve_model`).
A worker that refuses to start (the memory budget, a corrupt or incompatible directory) fails the load with its
reason, and the workers already started for it are ended.  `unload` ends a model's workers, whether the
deployment started them or a load did.

Runs in the router actor's process, so the workers it starts belong to the router actor: a router that dies takes
the models loaded at run time with it, and its restart serves the deployment it was started with (the same holds
for vLLM's adapters loaded at run time).  Imports no torch: the actors' classes load the engine in their own
processes.
"""

from __future__ import annotations

import logging

import ray

from disagg.cluster.handles import RayWorkerHandle
from disagg.cluster.pools import ClusterConfig, LocalCluster
from disagg.cluster.router_service import ModelRoute, RouterConfig, serve_model
from disagg.cluster.worker_config import WorkerConfig
from disagg.http.models import ServedModel
from disagg.models.deployment import DeploymentError, ModelEntry, model_spec

log = logging.getLogger(__name__)


class RayModelLoader:
    def __init__(self, config: RouterConfig, template: WorkerConfig) -> None:
        self.config, self.template = config, template
        self.clusters: dict[str, LocalCluster] = {}  # the pools this loader started, by model id

    def load(self, entry: ModelEntry, namespace: str) -> ServedModel:
        spec = model_spec(entry, self.template.engine)
        try:
            cluster = LocalCluster(ClusterConfig.from_template(self.template, spec), spec.worker_prefix)
        except ray.exceptions.RayError as exc:  # a worker's constructor refused (its message says why)
            raise DeploymentError(f"the workers of {spec.id} did not start: {_reason(exc)}") from None
        self.clusters[spec.id] = cluster
        engine = cluster.config.engine
        prefill, decode = list(cluster.prefill_by_name), list(cluster.decode_by_name)
        route = ModelRoute(spec.id, engine.model, engine.block_size, engine.max_model_len, prefill, decode, namespace)
        node = ray.get_runtime_context().get_node_id()
        handles = {n: RayWorkerHandle(n, actor, node) for n, actor in cluster.workers_by_name.items()}
        return serve_model(self.config, route, handles, handles)

    def unload(self, model: ServedModel) -> None:
        cluster = self.clusters.pop(model.name, None)
        if cluster is not None:
            cluster.shutdown()
            return
        for name in model.core.handles:  # started with the deployment: ended by name
            try:
                ray.kill(ray.get_actor(name), no_restart=True)
            except ValueError:  # already gone
                log.info("unload %s: worker %s was already gone", model.name, name)


def _reason(exc: ray.exceptions.RayError) -> str:
    """The first line of the worker's own error, not Ray's wrapping of it."""
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
