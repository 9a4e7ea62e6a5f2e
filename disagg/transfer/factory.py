"""How a worker gets its KVTransport: NIXL, built from the worker's config, optionally wrapped by a callable the
config names.

The worker runs in its own process (a Ray actor), so whatever changes its transport has to travel as data: the
wrapper is named by a dotted path, "package.module:attribute", and resolved in the worker's process at start-up.
The product names none; the chaos benchmark and the tests name their fault-injecting wrapper
(tests/fake_transport.py), so no test double is imported by product code.  In-process tests skip all this and
hand the worker a transport factory directly.

A transport that can inject faults says so structurally (`FaultInjector`): the worker's `inject_fault` call
forwards to it, and refuses when the transport has no such method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from disagg.transfer.base import KVTransport
from disagg.transfer.config import TransportConfig

TransportWrapper = Callable[[KVTransport], KVTransport]


@runtime_checkable
class FaultInjector(Protocol):
    def inject(self, fault: str, count: int = 1, hang_s: float = 30.0) -> None:
        """Make the next `count` reads fail or hang (`fault` names the kind, e.g. "read_fail", "read_hang")."""


def resolve_wrapper(path: str) -> TransportWrapper:
    """The callable named "package.module:attribute" (ValueError if the name is malformed or not callable)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"transport wrapper {path!r} is not of the form 'package.module:attribute'")
    target = getattr(importlib.import_module(module_name), attr, None)
    if not callable(target):
        raise ValueError(f"transport wrapper {path!r} names nothing callable")
    return target


def nixl_transport(agent_name: str, device: torch.device, config: TransportConfig | None = None) -> KVTransport:
    """The product transport: a NIXL agent named `agent_name`."""
    from disagg.transfer.nixl import NixlTransport  # NIXL loads only where a worker runs

    return NixlTransport(agent_name, device, config)
