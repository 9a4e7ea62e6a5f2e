"""The fleet planner's port (planner/fleet_loop.py: FleetPort) over the router's model table: every base model's
signals from its routing core, and a move carried out on their cores (router/parking.py): the donor's workers
leave routing, the recipient's parked ones wake - at once (`wake_before_drain`: the donor's streams finish beside
them) or once the donor's have drained and slept (when both models' workers share one device's memory) - so the
number of workers taking requests never grows.  A park or a wake that fails is evened out: no capacity is lost,
and none is added."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from disagg.errors import DisaggError
from disagg.http.models import ModelState, ModelTable
from disagg.planner.fleet import FleetConfig, FleetMove, FleetSignals
from disagg.router.router import RouterCore


class TableFleetPort:
    def __init__(self, models: ModelTable, config: FleetConfig) -> None:
        self.models, self.config = models, config

    def signals(self, now: float) -> FleetSignals:
        changing = self.models.changing
        return FleetSignals(
            now,
            [
                m.core.fleet_signal(
                    m.name, self.config, now, serving=m.state is ModelState.SERVING and m.name not in changing
                )
                for m in self.models.bases()
            ],
        )

    async def move(self, move: FleetMove, timeout_s: float) -> None:
        donor, recipient = self.models.served(move.donor), self.models.served(move.recipient)
        left, errors = _leave(donor.core, move.park)
        settling = asyncio.gather(*(donor.core.settle(n, timeout_s) for n in left), return_exceptions=True)
        early = self.config.wake_before_drain
        woken = await _wake(recipient.core, move.wake[: len(left)], errors) if early else []
        answers = await settling
        parked = [n for n, a in zip(left, answers) if not isinstance(a, BaseException)]
        errors += [a for a in answers if isinstance(a, BaseException)]
        if not early:
            woken = await _wake(recipient.core, move.wake[: len(parked)], errors)
        for name in woken[len(parked) :]:  # a donor's worker did not drain (it serves again): the budget holds
            await _settled(recipient.core.park(name, timeout_s), errors)
        for name in parked[len(woken) :]:  # a wake failed: the donor gets its worker back, no capacity is lost
            await _settled(donor.core.wake_parked(name), errors)
        if errors:
            raise errors[0]


async def _settled(call: Awaitable[object], errors: list[BaseException]) -> None:
    """One correction; its failure is added to `errors` and the next correction still runs."""
    try:
        await call
    except DisaggError as exc:
        errors.append(exc)


def _leave(core: RouterCore, names: list[str]) -> tuple[list[str], list[BaseException]]:
    left: list[str] = []
    errors: list[BaseException] = []
    for name in names:
        try:
            core.leave(name)
            left.append(name)
        except DisaggError as exc:
            errors.append(exc)
    return left, errors


async def _wake(core: RouterCore, names: list[str], errors: list[BaseException]) -> list[str]:
    woken = []
    for name in names:
        try:
            await core.wake_parked(name)
            woken.append(name)
        except DisaggError as exc:
            errors.append(exc)
            break
    return woken
