"""Router replicas: several copies of the router - routing core and HTTP front door - behind Ray Serve, so no
single router process is a point of failure (`disagg serve --replicas N`, N >= 2).

Ray Serve is the front door's engine: its HTTP proxy accepts the connections and spreads requests over the
replicas (the fewest ongoing requests of two picked at random), and its controller restarts a replica that dies;
a request sent to a replica that just died is retried on another.  Each replica is the same composition as the
single router actor (cluster/router_service.py: RouterService), hosted by Serve instead of its own uvicorn.

What the replicas share, and how:
  - the KV index: every replica follows every worker's KV events (router/event_follow.py), so they all build the
    same index;
  - sessions: a conversation's blocks are in that index, and its pins on its worker, so its next turn goes to the
    same worker from any replica (each replica's session table only adds a tie-break);
  - admission: each replica admits up to 1/N of every worker's capacity limits (`for_replica`); the proxy spreads
    requests evenly, so the replicas together fill but never oversubscribe a worker, and weighted fair share,
    which holds within each replica, holds overall;
  - rate limits: each replica's bucket for a key fills at 1/N of the key's rate (`for_replica`); as the proxy
    spreads the key's requests, the buckets together admit its rate (a key whose requests all land on one replica
    gets 1/N there: the limit is never exceeded, it may bind early);
  - roles: a worker's reported role is the truth (RoleChangeConfig.follow_workers): a role set through any
    replica's admin API reaches the others with the worker's next heartbeat; only replica 0 runs the planner;
  - health: every replica probes every worker and routes around the ones it finds dead;
  - stored responses (the Responses API's previous_response_id) and uploaded files (the Files API): one small actor
    holds them for every replica (cluster/shared_stores.py), so a conversation's next turn continues, and a
    `file_id` is found, from any replica.
  - encoder workers (E/PD): every replica sends images to them, each with a 1/N share of an encoder's slots.
In-flight streams outlive the replica that relays them: see the token journal (README, "Reconnecting").

Lifecycle: `ServeFront.start` starts Serve's proxy on the router's host and port and deploys the replicas; it
returns once all of them answer.  `shutdown()` deletes the application (each replica's lifespan stops its core).
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

from disagg.cluster.handles import RayWorkerHandle
from disagg.cluster.model_loader import alive, encoder_ports
from disagg.cluster.router_service import RouterConfig, RouterService
from disagg.cluster.shared_stores import RayFiles, RayResponses, start_stores
from disagg.http.config import ApiKey

APP_NAME = "disagg"
DEPLOYMENT = "RouterReplica"


def for_replica(config: RouterConfig, rank: int, replicas: int) -> RouterConfig:
    """The settings of replica `rank` of `replicas`: a 1/N share of every worker's capacity limits and of every
    encoder's slots (at least one each), the roles the workers report, and the planner on replica 0 only (two
    planners would undo each other's moves)."""
    cap = config.capacity
    capacity = dataclasses.replace(
        cap,
        max_prefill_queue_tokens=max(1, cap.max_prefill_queue_tokens // replicas),  # rounded down: the shares
        max_running=max(1, cap.max_running // replicas),  # add up to no more than the worker's limit
        max_kv_fraction=cap.max_kv_fraction / replicas,
    )
    core = dataclasses.replace(config.core, roles=dataclasses.replace(config.core.roles, follow_workers=True))
    planner = dataclasses.replace(config.planner, enabled=config.planner.enabled and rank == 0)
    keys = {key: _rate_share(grant, replicas) for key, grant in config.keys.items()} if config.keys else config.keys
    slots = max(1, config.encode.max_inflight_per_encoder // replicas)
    encode = dataclasses.replace(config.encode, max_inflight_per_encoder=slots)
    return dataclasses.replace(config, capacity=capacity, core=core, planner=planner, keys=keys, encode=encode)


def _rate_share(grant: ApiKey, replicas: int) -> ApiKey:
    """A key's rate limit, 1/N of it per replica: the proxy spreads a key's requests over the replicas, so their
    buckets together admit its rate (a burst of 0 stays one second's worth of the share)."""
    if grant.requests_per_s <= 0:
        return grant
    burst = max(1, math.ceil(grant.burst / replicas)) if grant.burst else 0
    return dataclasses.replace(grant, requests_per_s=grant.requests_per_s / replicas, burst=burst)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class RouterReplica:
    """One router replica: a RouterService whose app Serve's proxy reaches (no uvicorn of its own)."""

    def __init__(self, config: bytes, prefill: list[str], decode: list[str], stores: str) -> None:
        context = serve.get_replica_context()
        settings = for_replica(RouterConfig.from_wire(config), context.rank.rank, context.world_size)
        node = ray.get_runtime_context().get_node_id()
        self.service = RouterService(
            settings,
            {n: RayWorkerHandle(n, ray.get_actor(n), node) for n in prefill},
            {n: RayWorkerHandle(n, ray.get_actor(n), node) for n in decode},
            encoders=encoder_ports(alive(settings.encoders)),
            serve_http=False,
            responses=RayResponses(ray.get_actor(stores)),  # the stores every replica shares
            files=RayFiles(ray.get_actor(stores)),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.service.app


@dataclasses.dataclass
class ReplicaOptions:
    """How Serve runs the replicas.  The router queues requests itself (admission), so Serve's own per-replica
    limit is set far above any admission queue: Serve must not refuse or queue what the router would admit."""

    max_ongoing_requests: int = 100_000
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 10.0
    graceful_shutdown_timeout_s: float = 5.0


class ServeFront:
    """The replicas of one cluster's router, deployed as a Serve application on the router's host and port."""

    def __init__(self, config: RouterConfig, options: ReplicaOptions | None = None) -> None:
        if config.replicas < 1:
            raise ValueError("a router needs at least one replica")
        self.config = config
        self.options = options or ReplicaOptions()
        self.url = f"http://{config.host}:{config.port}"
        self.store_name = f"disagg-stores-{uuid.uuid4().hex[:8]}"  # one per front: clusters may share Ray
        self.store: Any = None  # the shared stores' actor (responses, files), while started

    def start(self, prefill: list[str], decode: list[str], resources: dict[str, float] | None = None) -> str:
        o = self.options
        serve.start(http_options={"host": self.config.host, "port": self.config.port})
        deployment = RouterReplica.options(  # type: ignore[attr-defined]  # added by @serve.deployment
            num_replicas=self.config.replicas,
            max_ongoing_requests=o.max_ongoing_requests,
            health_check_period_s=o.health_check_period_s,
            health_check_timeout_s=o.health_check_timeout_s,
            graceful_shutdown_timeout_s=o.graceful_shutdown_timeout_s,
            ray_actor_options={"num_cpus": 0, "resources": resources or {}},
        )
        self.store = start_stores(self.store_name, self.config.responses, self.config.files, resources)
        bound = deployment.bind(self.config.to_wire(), prefill, decode, self.store_name)
        serve.run(bound, name=APP_NAME, route_prefix="/")
        return self.url

    def shutdown(self) -> None:
        serve.shutdown()  # deletes the application: each replica's lifespan stops its core
        if self.store is not None:
            ray.kill(self.store)
            self.store = None
