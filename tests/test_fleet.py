"""One budget across models (issue 25, part 5): the fleet planner's rules (planner/fleet.py, pure) and parking on a
routing core (router/parking.py: drain, sleep, wake, what heartbeats say).  The real cluster over HTTP is in
tests/test_fleet_live.py."""
import asyncio

import pytest

from disagg.errors import Conflict
from disagg.planner.fleet import FleetConfig, FleetHold, FleetMove, FleetPlanner, FleetSignals, FleetWorker, ModelSignal
from disagg.protocol import Role, SleepReport, SleepState
from disagg.router.health import HealthConfig, HealthMonitor
from disagg.router.parking import Parking, ParkingConfig
from disagg.router.ranking import WorkerLoad

ON = FleetConfig(enabled=True, confirm_rounds=2, cooldown_s=5, min_dwell_s=10, reversal_window_s=100)


def _model(name, active, parked=0, queued=0, max_running=4):
    """`active`: requests running on each awake decoder; `parked`: parked workers."""
    workers = [FleetWorker(f"{name}-d{i}", Role.BOTH, n, parked=False, routable=True) for i, n in enumerate(active)]
    workers += [FleetWorker(f"{name}-s{i}", Role.BOTH, 0, parked=True, routable=False) for i in range(parked)]
    return ModelSignal(name, workers, queued, max_running)


def _decide(planner, now, *models):
    return planner.decide(FleetSignals(now, list(models)))


def test_a_hot_model_gets_a_quiet_model_s_least_loaded_worker_after_confirmation():
    planner = FleetPlanner(ON)
    hot, quiet = _model("a", [4, 4], parked=1, queued=6), _model("b", [1, 0, 0], parked=0)
    assert _decide(planner, 0.0, hot, quiet) is FleetHold.CONFIRMING
    move = _decide(planner, 1.0, hot, quiet)
    assert isinstance(move, FleetMove)
    assert (move.donor, move.recipient, move.park, move.wake) == ("b", "a", ["b-d1"], ["a-s0"])
    planner.applied(move, 1.0)
    assert _decide(planner, 2.0, hot, quiet) is FleetHold.CONFIRMING  # the streak starts again after a move
    assert _decide(planner, 3.0, hot, quiet) is FleetHold.COOLDOWN


def test_a_sharp_shift_moves_as_many_workers_as_the_donor_can_spare_in_one_move():
    planner = FleetPlanner(ON)
    hot, idle = _model("a", [4, 4], parked=3, queued=20), _model("b", [0, 0, 0, 0])
    _decide(planner, 0.0, hot, idle)
    move = _decide(planner, 1.0, hot, idle)  # 28 requests: 5 workers bring a to 28/20 = 1.4 (all it has parked)
    assert move.park == ["b-d0", "b-d1", "b-d2"] and move.wake == ["a-s0", "a-s1", "a-s2"]  # b keeps one
    busy = _model("b", [2, 2, 0, 0], queued=1)  # parking 2 would leave 5 requests on 2: 5/8 > donor_load_max
    _decide(planner, 10.0, hot, busy)
    assert _decide(planner, 11.0, hot, busy).park == ["b-d2"]
    calm = _model("a", [3, 2], parked=3)  # 5 requests: one more worker brings a to 5/12 = 0.42 <= target_load
    assert planner.config.target_load == 0.7 and planner._wanted(calm) == 1


def test_no_move_when_nobody_is_hot_or_the_hot_model_has_nothing_to_wake():
    planner = FleetPlanner(ON)
    assert _decide(planner, 0.0, _model("a", [3, 3], parked=1), _model("b", [0, 0])) is FleetHold.BALANCED
    assert _decide(planner, 1.0, _model("a", [4, 4], queued=9), _model("b", [0, 0])) is FleetHold.NO_STANDBY
    assert FleetPlanner(FleetConfig()).decide(FleetSignals(0.0, [])) is FleetHold.DISABLED


def test_a_hot_model_cannot_starve_a_quiet_one():
    planner = FleetPlanner(ON)
    hot = _model("a", [4, 4], parked=2, queued=50)
    # b's worker left would hold its own 3 requests: 3/4 of max_running, above donor_load_max
    assert _decide(planner, 0.0, hot, _model("b", [3, 3])) is FleetHold.NO_DONOR
    # b's last awake worker never goes, however idle
    assert _decide(planner, 1.0, hot, _model("b", [0])) is FleetHold.NO_DONOR
    # a model that is not serving (unloading, asleep) is neither donor nor recipient
    off = _model("b", [0, 0, 0])
    off.serving = False
    assert _decide(planner, 2.0, hot, off) is FleetHold.NO_DONOR


def test_hysteresis_dwell_and_one_reversal_per_window():
    planner = FleetPlanner(ON)
    a_hot = (_model("a", [4, 4], parked=1, queued=5), _model("b", [0, 0, 0], parked=1))
    b_hot = (_model("a", [0, 0, 0], parked=1), _model("b", [4, 4], parked=1, queued=5))
    _decide(planner, 0.0, *a_hot)
    planner.applied(_decide(planner, 1.0, *a_hot), 1.0)  # b -> a
    # b gave at t=1: it may not take one back before the dwell ends, nor a give what it just gained
    assert _decide(planner, 2.0, *b_hot) is FleetHold.NO_STANDBY
    assert _decide(planner, 8.0, *b_hot) is FleetHold.NO_STANDBY
    _decide(planner, 12.0, *b_hot)
    reverse = _decide(planner, 13.0, *b_hot)
    assert isinstance(reverse, FleetMove) and (reverse.donor, reverse.recipient) == ("a", "b")
    planner.applied(reverse, 13.0)  # the first reversal of this pair: allowed
    _decide(planner, 30.0, *a_hot)
    assert _decide(planner, 31.0, *a_hot) is FleetHold.NO_DONOR  # a second one within the window: not
    _decide(planner, 120.0, *a_hot)
    assert isinstance(_decide(planner, 121.0, *a_hot), FleetMove)  # after the window: allowed again


class FakeHandle:
    def __init__(self, name, conflicts=0):
        self.name, self.asleep, self.conflicts, self.calls = name, False, conflicts, []

    async def sleep(self, timeout_s):
        self.calls.append("sleep")
        if self.conflicts:
            self.conflicts -= 1
            raise Conflict(f"{self.name}: KV blocks are still leased to a reader")
        self.asleep = True
        return SleepReport(self.name, SleepState.ASLEEP, 4096, 0.001, 0)

    async def wake(self, timeout_s):
        self.calls.append("wake")
        self.asleep = False
        return SleepReport(self.name, SleepState.AWAKE, 0, 0.001, 0)


def _parking(names=("w0", "w1"), conflicts=0):
    health = HealthMonitor(HealthConfig(), {n: Role.BOTH for n in names})
    loads = {n: WorkerLoad(n) for n in names}
    handles = {n: FakeHandle(n, conflicts) for n in names}
    changing: set[str] = set()
    return Parking(health, loads, handles, changing.__contains__, ParkingConfig(poll_s=0.01)), loads, handles


def test_park_drains_first_then_sleeps_and_wake_routes_it_again():
    async def run():
        parking, loads, handles = _parking()
        loads["w0"].active_requests = 1
        task = asyncio.create_task(parking.park("w0", timeout_s=5))
        await asyncio.sleep(0.05)
        assert not parking.health.routable("w0") and handles["w0"].calls == []  # out of routing, still draining
        loads["w0"].active_requests = 0
        report = await task
        assert report.state is SleepState.ASLEEP and handles["w0"].asleep
        assert "w0" in parking.health.parked and parking.health.live_counts()["both"] == 1
        with pytest.raises(Conflict, match="last awake decoder"):
            await parking.park("w1", timeout_s=1)
        await parking.wake("w0")
        assert parking.health.routable("w0") and not handles["w0"].asleep

    asyncio.run(run())


def test_a_park_that_does_not_drain_in_time_serves_again_and_a_lease_is_waited_for():
    async def run():
        parking, loads, handles = _parking()
        loads["w0"].active_requests = 1
        with pytest.raises(Conflict, match="still running"):
            await parking.park("w0", timeout_s=0.1)
        assert parking.health.routable("w0") and handles["w0"].calls == []  # nothing cut short
        parking2, _, handles2 = _parking(conflicts=2)
        await parking2.park("w0", timeout_s=5)  # refused twice for a lease, then asleep
        assert handles2["w0"].calls == ["sleep"] * 3 and handles2["w0"].asleep

    asyncio.run(run())


def test_heartbeats_reconcile_parking_with_what_the_workers_say():
    async def run():
        parking, _, handles = _parking(("w0", "w1", "w2"))
        parking.standby(["w2"])
        parking.reconcile("w2", asleep=True)  # a standby, asleep as started: stays parked
        assert "w2" in parking.health.parked
        parking.reconcile("w2", asleep=False)  # later awake while parked: restarted; it sleeps again
        await asyncio.sleep(0.05)
        assert handles["w2"].calls == ["sleep"]
        parking.reconcile("w1", asleep=False)
        parking.reconcile("w1", asleep=True)  # later asleep, not parked (a lost answer, a stale report): it wakes
        await asyncio.sleep(0.05)
        assert handles["w1"].calls == ["wake"] and parking.health.routable("w1")
        other, _, _ = _parking(("a", "b"))
        other.standby(["b"])
        other.paused = True  # the whole model sleeps: its workers are asleep on purpose
        other.reconcile("a", asleep=True)
        assert "a" not in other.health.parked
        other.paused = False
        other.reconcile("b", asleep=False)  # first seen awake though a standby: the fleet woke it before us
        assert other.health.routable("b")

    asyncio.run(run())


@pytest.mark.parametrize("order", [("a1", "as"), ("as", "a1")])
def test_a_restarted_router_takes_every_worker_s_first_word_whatever_the_order(order):
    async def run():
        # before the restart the fleet woke the standby `as` and parked `a1`: the restarted core assumes the
        # opposite (its deployment's standby list) until their first heartbeats
        parking, _, handles = _parking(("a0", "a1", "as"))
        parking.standby(["as"])
        for name in order:
            parking.reconcile(name, asleep=name == "a1")
        parking.reconcile("a0", asleep=False)
        await asyncio.sleep(0.05)
        assert parking.health.parked == {"a1"} and all(h.calls == [] for h in handles.values())

    asyncio.run(run())


def test_a_restarted_router_wakes_a_model_that_slept_whole_except_its_standby():
    async def run():
        parking, _, handles = _parking(("a0", "a1", "as"))
        parking.standby(["as"])
        for name in ("a0", "a1", "as"):
            parking.reconcile(name, asleep=True)  # the model was asleep when this router started
        await asyncio.sleep(0.05)
        assert parking.health.parked == {"as"}  # what the deployment had awake serves again
        assert handles["a0"].calls == ["wake"] and handles["a1"].calls == ["wake"] and handles["as"].calls == []

    asyncio.run(run())


def test_a_role_change_never_leaves_only_parked_decoders_and_a_parked_worker_keeps_its_role():
    from disagg.errors import InvalidRequest
    from disagg.router.roles import RoleChanger
    from disagg.stats import RouterCounters

    parking, loads, handles = _parking(("w0", "w1"))
    roles = RoleChanger(parking.health, loads, handles, RouterCounters(), lambda n, r: None)
    parking.standby(["w1"])
    with pytest.raises(InvalidRequest, match="last decode-capable"):
        roles.validate("w0", Role.PREFILL)  # w1 is asleep: it decodes nothing
    with pytest.raises(InvalidRequest, match="parked"):
        roles.validate("w1", Role.PREFILL)


def test_the_need_is_confirmed_while_the_donor_frees_up():
    planner = FleetPlanner(ON)
    hot, busy, freed = _model("a", [4, 4], parked=1, queued=4), _model("b", [4, 4]), _model("b", [1, 0])
    assert _decide(planner, 0.0, hot, busy) is FleetHold.NO_DONOR
    assert _decide(planner, 1.0, hot, busy) is FleetHold.NO_DONOR  # a has been hot for 2 rounds now
    assert isinstance(_decide(planner, 2.0, hot, freed), FleetMove)  # no further confirmation once b can give


def test_a_model_whose_traffic_fell_gives_at_once_not_once_its_backlog_drained():
    from disagg.router.latency import LatencyWindow

    window = LatencyWindow()
    for i in range(10):  # 10 requests sent over the last 5 s, each 2 s in the system
        window.arrived(95.0 + i * 0.5)
        window.record(started=90.0 + i, first_token=90.5 + i, finished=92.0 + i, num_tokens=8)
    assert window.expected_in_flight(5.0, 30.0, now=100.0) == pytest.approx(2 * 2.0)  # 2 req/s x 2 s
    assert LatencyWindow().expected_in_flight(5.0, 30.0, now=100.0) is None  # nothing finished: not measured

    planner = FleetPlanner(ON)
    hot = _model("a", [4, 4], parked=2, queued=8)
    cooled = _model("b", [4, 4, 4])  # still busy with the requests it was sent before its traffic fell
    assert _decide(planner, 0.0, hot, cooled) is FleetHold.NO_DONOR
    cooled.expected = 2.0  # at the rate it is sent now it would hold 2 requests
    move = _decide(planner, 1.0, hot, cooled)
    assert isinstance(move, FleetMove) and len(move.park) == 2  # its streams finish where they are


class FakeCore:
    """The parking calls the fleet's port makes on a model's core, over a real Parking."""

    def __init__(self, names, standby=(), fail_wake=()):
        self.parking, self.loads, self.handles = _parking(names)
        self.parking.standby(list(standby))
        for name in standby:
            self.handles[name].asleep = True
        self.fail_wake = set(fail_wake)
        self.leave, self.settle, self.park = self.parking.leave, self.parking.settle, self.parking.park

    async def wake_parked(self, name):
        if name in self.fail_wake:
            from disagg.errors import WorkerLost
            raise WorkerLost(f"{name} died")
        return await self.parking.wake(name)


def _port(donor, recipient, **config):
    from disagg.http.fleet_port import TableFleetPort
    from disagg.http.models import ModelTable, ServedModel

    table = ModelTable([ServedModel("a", recipient, None, 64), ServedModel("b", donor, None, 64)])
    return TableFleetPort(table, FleetConfig(enabled=True, **config))


def test_the_port_wakes_as_soon_as_the_donor_stops_taking_requests_and_evens_out_failures():
    async def run():
        donor, recipient = FakeCore(("b0", "b1")), FakeCore(("a0", "a1"), standby=("a1",))
        donor.loads["b0"].active_requests = 1  # a stream still running on the worker that leaves
        move = FleetMove("b", "a", ["b0"], ["a1"], None, "")
        task = asyncio.create_task(_port(donor, recipient).move(move, timeout_s=5))
        await asyncio.sleep(0.05)
        assert recipient.parking.health.routable("a1")  # woken while b0 still drains
        assert not donor.parking.health.routable("b0") and not donor.handles["b0"].asleep
        donor.loads["b0"].active_requests = 0
        await task
        assert donor.handles["b0"].asleep and "b0" in donor.parking.health.parked

        late_d, late_r = FakeCore(("b0", "b1")), FakeCore(("a0", "a1"), standby=("a1",))
        late_d.loads["b0"].active_requests = 1
        task = asyncio.create_task(_port(late_d, late_r, wake_before_drain=False).move(move, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not late_r.parking.health.routable("a1")  # devices shared: only once b0 sleeps
        late_d.loads["b0"].active_requests = 0
        await task
        assert late_r.parking.health.routable("a1")

        stuck_d, stuck_r = FakeCore(("b0", "b1")), FakeCore(("a0", "a1"), standby=("a1",))
        stuck_d.loads["b0"].active_requests = 1  # never finishes: its park fails, it serves again
        with pytest.raises(Conflict, match="still running"):
            await _port(stuck_d, stuck_r).move(move, timeout_s=0.2)
        assert stuck_d.parking.health.routable("b0")
        assert "a1" in stuck_r.parking.health.parked and stuck_r.handles["a1"].asleep  # the early wake undone

        broken_d, broken_r = FakeCore(("b0", "b1")), FakeCore(("a0", "a1"), standby=("a1",), fail_wake=("a1",))
        with pytest.raises(Exception, match="a1 died"):
            await _port(broken_d, broken_r, wake_before_drain=False).move(move, timeout_s=5)
        assert broken_d.parking.health.routable("b0")  # the donor got its worker back: no capacity lost

    asyncio.run(run())


def test_a_demand_deep_enough_needs_no_confirmation():
    planner = FleetPlanner(ON)
    flooded = _model("a", [4, 4], parked=1, queued=10)  # 18 requests on 2 x 4 slots: 2.25 > urgent_load
    assert isinstance(_decide(planner, 0.0, flooded, _model("b", [0, 0])), FleetMove)
    busy = _model("a", [4, 4], parked=1, queued=2)  # 1.25: confirmed first
    assert _decide(FleetPlanner(ON), 0.0, busy, _model("b", [0, 0])) is FleetHold.CONFIRMING


def test_no_request_pulls_a_prefix_from_a_parked_worker():
    from disagg.protocol import EventKind, KVEvent, KVEventBatch, Request, SamplingParams, Tier
    from disagg.router.policy import PolicyConfig
    from disagg.router.router import RouterCore

    core = RouterCore({}, {"a": None, "b": None}, PolicyConfig(seed=0, min_peer_pull_blocks=2), 16)
    request = Request("r", list(range(40, 40 + 96)) + [7, 8, 9], SamplingParams(max_tokens=4, temperature=0))
    hashes = core.block_hashes(request)
    core.on_kv_events(KVEventBatch("a", 0, [KVEvent(EventKind.STORED, hashes, None, Tier.CPU)]))
    core.loads["a"].active_blocks = 10_000  # busy: the request goes to b
    assert core.route(request).peer_worker == "a"  # a's CPU tier holds the prefix
    core.health.parked.add("a")  # asleep: it offers nothing
    decision = core.route(request)
    assert decision.decode_worker == "b" and decision.peer_worker is None


def test_little_s_estimate_already_counts_the_queue_and_the_queue_is_its_floor():
    planner = FleetPlanner(ON)
    hot = _model("a", [4, 4], parked=1, queued=8)
    cooled = _model("b", [4, 4, 4], queued=2)
    cooled.expected = 3.0  # Little's L: the 2 queued are among these 3 (time in the system includes the queue)
    assert cooled.demand_without(1) == pytest.approx(3 / 8)  # not (2 + 3) / 8, above donor_load_max
    _decide(planner, 0.0, hot, cooled)
    assert isinstance(_decide(planner, 1.0, hot, cooled), FleetMove)
    backlog = _model("b", [4, 4, 4], queued=3)
    backlog.expected = 0.5  # sent little now, but 3 wait now and must be served by the workers it keeps
    assert backlog.demand_without(1) == pytest.approx(3 / 8)


def test_requests_draining_on_a_worker_given_away_are_not_the_model_s_demand():
    planner = FleetPlanner(ON)
    a = _model("a", [3, 3], parked=1)
    draining = a.workers[-1]
    draining.active_requests, draining.changing = 4, True  # parked a moment ago, its streams finish there
    assert a.demand() == pytest.approx(6 / 8)  # its awake workers' requests, not 10 / 8
    assert _decide(planner, 0.0, a, _model("b", [0, 0], parked=1)) is FleetHold.BALANCED


def test_the_fleet_loop_starts_hysteresis_when_a_move_ends():
    import time

    from disagg.planner.fleet_loop import FleetLoop

    class SlowPort:
        def __init__(self):
            self.moved = []

        def signals(self, now):
            return FleetSignals(now, [_model("a", [4, 4], parked=1, queued=12), _model("b", [0, 0, 0])])

        async def move(self, move, timeout_s):
            await asyncio.sleep(0.2)  # the donor's drain
            self.moved.append(move)

    loop = FleetLoop(SlowPort(), FleetConfig(enabled=True, confirm_rounds=1))
    started = time.monotonic()
    assert isinstance(asyncio.run(loop.step()), FleetMove)
    assert loop.planner.last_move_at is not None and loop.planner.last_move_at >= started + 0.2
    assert loop.planner.gained["a"] == loop.planner.gave["b"] == loop.planner.last_move_at


def test_a_move_that_failed_only_cools_down():
    from disagg.errors import WorkerLost
    from disagg.planner.fleet_loop import FleetLoop

    class BrokenPort:
        def signals(self, now):
            return FleetSignals(now, [_model("a", [4, 4], parked=1, queued=12), _model("b", [0, 0, 0])])

        async def move(self, move, timeout_s):
            raise WorkerLost("the recipient's worker died while waking")

    loop = FleetLoop(BrokenPort(), FleetConfig(enabled=True, confirm_rounds=1))
    with pytest.raises(WorkerLost):
        asyncio.run(loop.step())
    assert loop.failed == 1 and loop.planner.last_move_at is not None  # the cooldown
    assert loop.planner.gained == {} and loop.planner.gave == {} and loop.planner.pairs == {}  # nothing moved
