"""The request state machine on its own: every transition of `Flight`, the actions it asks for in order, and the
events it refuses.  Both drivers (the asyncio router and the simulator) are tested elsewhere against it."""
import pytest

from disagg.errors import DeadlineExceeded, ServiceUnavailable, WorkerLost
from disagg.protocol import FallbackKind, PrefillResult, Request, SamplingParams, ServePath, TokenDelta
from disagg.router.correction import CorrectionConfig, TtftCorrection
from disagg.router.flight import (
    Abort,
    Admitted,
    ChargeTenant,
    CountFallback,
    CountMigration,
    CountPath,
    Delta,
    Emit,
    EndLoad,
    Fail,
    FetchKV,
    Flight,
    FlightState,
    IllegalEvent,
    KVFailed,
    KVReady,
    Lost,
    PumpAdmission,
    RecordLatency,
    ReleaseLease,
    ReportProgress,
    RouteAttempt,
    Routed,
    StartDecode,
    apply_count,
)
from disagg.router.latency import apply_latency
from disagg.router.latency import LatencyWindow
from disagg.router.load import LoadTicket
from disagg.router.decision import Decision
from disagg.stats import RouterCounters

REQ = Request("r1", [1, 2, 3, 4], SamplingParams(max_tokens=4))



def _ticket(decode="d0"):
    return LoadTicket(prefilling=decode, decode=decode, num_prompt_tokens=4, blocks=1)


def _result():
    return PrefillResult("r1", "p0", [0], [], 4, first_token=7)


def _kinds(actions):
    return [type(a) for a in actions]


def _routed(flight, decode="d0", prefill=None, peer=None):
    return flight.on(Routed(Decision(decode, prefill, 0, peer_worker=peer), _ticket(decode)))


def test_local_request_streams_and_finishes_with_its_bookkeeping_in_order():
    flight = Flight(REQ, tenant="t", arrival=1.0)
    assert flight.on(Admitted(1.5)) == [RouteAttempt(REQ, 0)]
    actions = flight.on(Routed(Decision("d0", None, 0, predicted_ttft_s=0.4, ttft_measured=True), _ticket()))
    assert actions == [CountPath(ServePath.LOCAL), StartDecode("d0", REQ, None)]
    assert flight.state is FlightState.STREAMING
    first = flight.on(Delta(TokenDelta("r1", [5], "a"), 2.0))
    assert _kinds(first) == [ReportProgress, PumpAdmission, ChargeTenant, Emit]
    last = flight.on(Delta(TokenDelta("r1", [6, 7], "bc", finish_reason="length"), 3.0))
    # settled before the last delta goes out (a client may stop reading at it): the Emit is always last
    assert _kinds(last) == [ReportProgress, ChargeTenant, RecordLatency, EndLoad, PumpAdmission, Emit]
    assert last[0].generated == 3 and last[1] == ChargeTenant("t", 2)
    assert last[2] == RecordLatency(1.0, 2.0, 3.0, 3, predicted_ttft_s=0.4, routed_at=1.5, priced_on="d0")
    assert flight.state is FlightState.DONE and flight.sent == [5, 6, 7]
    counters, window = RouterCounters(), LatencyWindow()
    apply_latency(window, counters, last[2])  # predicted 0.4 s from routing, took 0.5 s: 20% off
    assert counters.ttft_predictions == 1 and counters.ttft_prediction_error == pytest.approx(0.2)
    assert counters.ttft_prediction_error_within == [0, 0, 1, 1, 1, 1, 1]  # within 0.2 and above, not 0.05 or 0.1
    assert len(window.samples) == 1


def test_an_outcome_teaches_the_computing_worker_s_correction_from_the_raw_prediction():
    """The flight names the worker that computed the prompt (the prefill worker, else the decode worker) and the
    factor its prediction carried; the window's correction learns actual / (predicted / factor)."""
    correction = TtftCorrection(CorrectionConfig(min_samples=1))
    window = LatencyWindow(correction=correction)
    flight = Flight(REQ, arrival=0.0)
    flight.on(Admitted(0.0))
    flight.on(Routed(Decision("d0", "p0", 0, predicted_ttft_s=0.6, ttft_factor=1.5, ttft_measured=True), _ticket()))
    flight.on(KVReady(_result()))
    flight.on(Delta(TokenDelta("r1", [7]), 0.8))
    done = flight.on(Delta(TokenDelta("r1", [8], finish_reason="stop"), 1.0))
    [record] = [a for a in done if isinstance(a, RecordLatency)]
    assert (record.priced_on, record.ttft_factor) == ("p0", 1.5)
    apply_latency(window, RouterCounters(), record)
    assert correction.factor("p0") == pytest.approx(0.8 / 0.4) and correction.factor("d0") == 1.0
    prior = Flight(REQ, arrival=0.0)  # priced from the cold-start prior: another model, it teaches nothing
    prior.on(Admitted(0.0))
    prior.on(Routed(Decision("d0", None, 0, predicted_ttft_s=0.1, ttft_measured=False), _ticket()))
    prior.on(Delta(TokenDelta("r1", [7]), 0.8))
    done = prior.on(Delta(TokenDelta("r1", [8], finish_reason="stop"), 1.0))
    [record] = [a for a in done if isinstance(a, RecordLatency)]
    assert record.priced_on == ""
    apply_latency(window, RouterCounters(), record)
    assert correction.factor("d0") == 1.0
    fallback = Flight(REQ, arrival=0.0)  # the prefill worker failed: the decode worker computed the prompt
    fallback.on(Admitted(0.0))
    fallback.on(Routed(Decision("d0", "p0", 0, predicted_ttft_s=0.1, ttft_measured=True), _ticket()))
    fallback.on(KVFailed(DeadlineExceeded("prefill took too long")))
    fallback.on(Delta(TokenDelta("r1", [7]), 0.8))
    done = fallback.on(Delta(TokenDelta("r1", [8], finish_reason="stop"), 1.0))
    [record] = [a for a in done if isinstance(a, RecordLatency)]
    assert record.priced_on == ""  # neither p0's outcome (it computed nothing) nor d0's (its price was p0's)
    pulled = Flight(REQ, arrival=0.0)  # a peer's prefix pulled: priced as computed, so it teaches nothing
    pulled.on(Admitted(0.0))
    pulled.on(Routed(Decision("d0", None, 0, predicted_ttft_s=0.1, ttft_measured=True, peer_worker="d1"), _ticket()))
    pulled.on(KVReady(_result()))
    pulled.on(Delta(TokenDelta("r1", [7]), 0.8))
    done = pulled.on(Delta(TokenDelta("r1", [8], finish_reason="stop"), 1.0))
    assert [a.priced_on for a in done if isinstance(a, RecordLatency)] == [""]


def test_remote_prefill_hands_off_then_releases_the_owner_when_done():
    flight = Flight(REQ)
    flight.on(Admitted(0.0))
    assert _routed(flight, prefill="p0") == [FetchKV("p0", REQ, FallbackKind.PREFILL)]
    assert flight.state is FlightState.PREFILLING
    result = _result()
    assert flight.on(KVReady(result)) == [CountPath(ServePath.DISAGGREGATED), StartDecode("d0", REQ, result)]
    assert flight.state is FlightState.HANDING_OFF
    flight.on(Delta(TokenDelta("r1", [7]), 1.0))
    assert flight.state is FlightState.STREAMING
    done = flight.on(Delta(TokenDelta("r1", [8], finish_reason="stop"), 2.0))
    assert ReleaseLease("p0") in done and flight.state is FlightState.DONE


def test_a_failed_remote_prefill_falls_back_to_a_local_prefill_and_releases_the_lease():
    flight = Flight(REQ)
    flight.on(Admitted(0.0))
    _routed(flight, prefill="p0")
    error = DeadlineExceeded("prefill took too long")
    actions = flight.on(KVFailed(error))
    assert actions == [CountFallback(FallbackKind.PREFILL, "p0", error), ReleaseLease("p0"),
                       CountPath(ServePath.FALLBACK), StartDecode("d0", REQ, None)]
    done = flight.on(Delta(TokenDelta("r1", [1], finish_reason="stop"), 1.0))
    assert not any(isinstance(a, ReleaseLease) for a in done)  # released once, at the fallback


def test_a_peer_with_nothing_to_offer_is_a_fallback_without_a_lease():
    flight = Flight(REQ)
    flight.on(Admitted(0.0))
    assert _routed(flight, peer="d1") == [FetchKV("d1", REQ, FallbackKind.PEER_PREFIX)]
    assert flight.on(KVReady(None)) == [CountPath(ServePath.FALLBACK), StartDecode("d0", REQ, None)]
    assert flight.owner is None


def test_a_lost_decode_worker_migrates_resumed_after_the_delivered_tokens():
    flight = Flight(REQ, max_migrations=1)
    flight.on(Admitted(0.0))
    _routed(flight, prefill="p0")
    flight.on(KVReady(_result()))
    flight.on(Delta(TokenDelta("r1", [5, 6], "xy"), 1.0))
    died = WorkerLost("d0 died", worker="d0")
    actions = flight.on(Lost("d0", died))
    resumed = REQ.resumed([5, 6], 2)
    assert actions == [CountMigration("d0", 2, died), ReleaseLease("p0"), EndLoad(_ticket()), RouteAttempt(resumed, 1, lost="d0")]
    assert flight.state is FlightState.MIGRATING
    assert _routed(flight, decode="d1") == [CountPath(ServePath.MIGRATED), StartDecode("d1", resumed, None)]
    # the second attempt's first output is its first again (the prefill queue), the latency covers both
    first = flight.on(Delta(TokenDelta("r1", [7]), 2.0))
    assert PumpAdmission() in first and first[0].generated == 1
    # past the limit: an explicit error, the load ended
    actions = flight.on(Lost("d1", WorkerLost("d1 died", worker="d1")))
    assert _kinds(actions) == [CountMigration, EndLoad, PumpAdmission, Fail]
    assert isinstance(actions[-1].error, ServiceUnavailable) and actions[-1].error.code == "migration_limit"
    assert flight.state is FlightState.FAILED


def test_abort_ends_the_load_once_and_events_out_of_order_are_refused():
    flight = Flight(REQ)
    with pytest.raises(IllegalEvent):
        flight.on(Delta(TokenDelta("r1", [1]), 0.0))  # nothing was started
    flight.on(Admitted(0.0))
    _routed(flight, prefill="p0")
    with pytest.raises(IllegalEvent):
        flight.on(Admitted(0.0))
    assert _kinds(flight.on(Abort())) == [EndLoad, PumpAdmission]
    assert flight.on(Abort()) == [] and flight.state is FlightState.FAILED
    with pytest.raises(IllegalEvent):
        flight.on(KVReady(_result()))


def test_count_actions_add_up_on_the_router_counters_the_same_for_both_drivers():
    counters = RouterCounters()
    error = WorkerLost("p0 died", worker="p0")
    for action in [CountPath(ServePath.LOCAL), CountPath(ServePath.LOCAL), CountPath(ServePath.MIGRATED),
                   CountFallback(FallbackKind.PEER_PREFIX, "d1", error), CountMigration("d0", 3, error),
                   CountMigration("d1", 0, error)]:
        apply_count(counters, action)
    assert counters.paths == {ServePath.LOCAL: 2, ServePath.MIGRATED: 1}
    assert counters.fallbacks == {FallbackKind.PEER_PREFIX: 1}
    assert counters.migrations == 2
