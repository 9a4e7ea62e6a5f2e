"""Start the serving system on Ray: engine workers (cluster/pools.py, one pool set per model of a deployment) and
the router actor with its HTTP endpoint (the router follows the workers' KV events).

`disagg serve`'s command line is disagg/cluster/serve_cli.py; this module is also run by
`ray job submit -- python -m disagg.cluster.launch ...` (inside a Ray job, `ray.init()` joins the job's cluster
through RAY_ADDRESS).
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from typing import Any

import ray

from disagg.cluster.model_loader import route_of
from disagg.cluster.pools import ClusterConfig, LocalCluster, init_ray
from disagg.cluster.router_actor import RouterActor
from disagg.cluster.router_service import ModelRoute, RouterConfig
from disagg.cluster.runtime_table import GcsTableStore, end_runtime_workers
from disagg.http.server import free_port
from disagg.models.deployment import Deployment, ModelSpec

__all__ = ["ClusterConfig", "LocalCluster", "RouterConfig", "Service", "init_ray"]  # what callers import from here


class Service:
    """LocalClusters (one, or one per model of a `deployment`) plus their router: one router actor (restarted on
    the same port if it dies) or, with `router.replicas` >= 2, that many replicas behind Ray Serve's HTTP proxy
    (cluster/replicas.py).  With a deployment, `cluster` gives the settings every model's pools start from."""

    def __init__(
        self,
        cluster: ClusterConfig,
        router: RouterConfig | None = None,
        router_max_restarts: int = -1,
        deployment: Deployment | None = None,
        *,
        name_prefix: str = "",
    ) -> None:
        """`name_prefix`: before every worker's name, so that several services share one Ray cluster."""
        router = router or RouterConfig()
        if deployment is None:
            self.clusters = {"": LocalCluster(cluster, name_prefix)}
        else:  # one model alone keeps a single-model cluster's worker names and hashes
            prefix = (lambda m: m.worker_prefix) if deployment.namespaced else (lambda m: "")
            self.clusters = {
                m.id: LocalCluster(cluster.for_model(m), name_prefix + prefix(m)) for m in deployment.models
            }
        self.cluster = next(iter(self.clusters.values()))  # the first (or only) model's
        config = self.cluster.config
        # the router hashes blocks and bounds prompts as the engines do, and traces as they do unless told otherwise
        self.router_config = router = dataclasses.replace(
            router,
            model=config.engine.model,
            block_size=config.engine.block_size,
            max_model_len=config.engine.max_model_len,
            models=[_route(m, self.clusters[m.id], deployment.namespaced) for m in deployment.models]
            if deployment is not None
            else [],
            worker_template=cluster.template(),  # models loaded at run time start from the same settings
            encoders=[n for c in self.clusters.values() for n in c.encoders_by_name],
        )
        if router.tracing is None:
            router.tracing = config.tracing
        if not router.port:  # pick it now, so a restarted router binds the same one
            router.port = free_port(router.host)
        prefill = [n for c in self.clusters.values() for n in c.prefill_by_name]
        workers = prefill, [n for c in self.clusters.values() for n in c.decode_by_name]
        self.router: Any = None  # the router actor (one replica)
        self.front: Any = None  # or Serve's replicas (cluster/replicas.py: ServeFront)
        if router.replicas > 1:
            from disagg.cluster.replicas import ServeFront  # Ray Serve is loaded only by clusters that use it

            self.front = ServeFront(router)
            self.url = self.front.start(*workers, resources=config.router_resources or None)
            return
        router.runtime_key = f"rt-{uuid.uuid4().hex[:12]}"  # models loaded at run time survive a restart
        self.router = RouterActor.options(  # type: ignore[attr-defined]  # added by @ray.remote
            max_restarts=router_max_restarts, resources=config.router_resources or None
        ).remote(router.to_wire(), *workers)
        self.url = ray.get(self.router.get_url.remote())

    def shutdown(self) -> None:
        if self.front is not None:
            self.front.shutdown()
        else:
            try:
                ray.get(self.router.stop.remote(), timeout=10)
            except (ray.exceptions.RayError, TimeoutError) as exc:  # the router may already be gone
                print(f"router stop: {type(exc).__name__}", file=sys.stderr)
            ray.kill(self.router, no_restart=True)
            key = self.router_config.runtime_key
            end_runtime_workers(GcsTableStore(key), key)  # detached: nothing else ends them
        for cluster in self.clusters.values():
            cluster.shutdown()


def _route(spec: ModelSpec, cluster: LocalCluster, namespaced: bool) -> ModelRoute:
    """How the router serves one model of a deployment: as a model loaded at run time (`route_of`), its id as the
    namespace of its block hashes when the deployment has several, with its aliases and adapters."""
    route = route_of(spec, cluster, spec.id if namespaced else "")
    route.aliases, route.adapters = list(spec.aliases), list(spec.adapters)
    return route


if __name__ == "__main__":  # `ray job submit -- python -m disagg.cluster.launch ...`
    from disagg.cluster.serve_cli import main

    sys.exit(main())
