"""Model aliases and versions (pure): an alias (`coder`) names one or more served models (`coder@1`, `coder@2`),
each with a weight, so a request for the alias goes to one of them in proportion - a canary is a small weight on
the new version, the cut-over is all of it, a rollback is the old version's weight back.

A request's target is drawn from a uniform number the caller supplies (the front door draws it per request), so
shares are exact in expectation and the table stays deterministic under test.  An alias never shadows a model id,
and a model named by an alias cannot be unloaded until the alias stops naming it (`pointing_at`).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

from disagg.errors import Conflict, InvalidRequest


@dataclass(frozen=True)
class AliasRoute:
    """An alias's targets in a fixed order, with their weights (positive; they need not add up to anything)."""

    targets: tuple[str, ...]
    weights: tuple[float, ...]

    def share(self, target: str) -> float:
        """The fraction of the alias's requests `target` gets."""
        total = sum(self.weights)
        return sum(w for t, w in zip(self.targets, self.weights) if t == target) / total

    def pick(self, u: float) -> str:
        """The target for a uniform draw `u` in [0, 1)."""
        bounds = list(itertools.accumulate(self.weights))
        return self.targets[min(bisect.bisect_right(bounds, u * bounds[-1]), len(self.targets) - 1)]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.targets, self.weights))


def _positive(weight: object) -> bool:
    return isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0


class AliasTable:
    def __init__(self) -> None:
        self._routes: dict[str, AliasRoute] = {}

    def set(self, alias: str, targets: dict[str, float], served: set[str]) -> AliasRoute:
        """Point `alias` at `targets` (model id -> weight), every one of them among the `served` ids."""
        if alias in served:
            raise Conflict(f"{alias!r} is a model id; an alias cannot shadow it", param="alias")
        if not targets:
            raise InvalidRequest("an alias needs at least one target", param="targets")
        unknown = sorted(set(targets) - served)
        if unknown:
            raise InvalidRequest(f"not served: {', '.join(unknown)}", param="targets", code="model_not_found")
        if not all(_positive(w) for w in targets.values()):
            raise InvalidRequest("every target's weight must be a positive finite number", param="targets")
        route = AliasRoute(tuple(targets), tuple(float(w) for w in targets.values()))
        self._routes[alias] = route
        return route

    def remove(self, alias: str) -> None:
        if self._routes.pop(alias, None) is None:
            raise InvalidRequest(f"no alias named {alias!r}", param="alias")

    def get(self, alias: str) -> AliasRoute | None:
        return self._routes.get(alias)

    def pointing_at(self, model: str) -> list[str]:
        """The aliases that send some of their requests to `model`."""
        return sorted(a for a, r in self._routes.items() if model in r.targets)

    def items(self) -> list[tuple[str, AliasRoute]]:
        return sorted(self._routes.items())
