import subprocess
import sys

import pytest

from disagg.protocol import KVEvent, Request, SamplingParams, TokenDelta, hash_block_tokens, hash_prompt_blocks


def test_block_hash_is_chained_and_deterministic_across_processes():
    h1 = hash_block_tokens(None, [1, 2, 3])
    assert h1 == hash_block_tokens(None, [1, 2, 3])
    assert h1 != hash_block_tokens(None, [1, 2, 4])
    assert hash_block_tokens(h1, [5]) != hash_block_tokens(None, [5])  # same tokens, other parent
    code = "from disagg.protocol import hash_block_tokens as h; print(h(None, [1, 2, 3]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123"})
    assert int(out.stdout) == h1
    assert 0 <= h1 < 2**64


def test_prompt_hashes_cover_full_blocks_only_and_share_prefixes():
    a = hash_prompt_blocks(list(range(40)), 16)
    b = hash_prompt_blocks(list(range(32)) + [99] * 20, 16)
    assert len(a) == 2 and len(b) == 3
    assert a == b[:2]


def test_messages_roundtrip_through_msgpack():
    req = Request("r1", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.5, stop=["\n"]))
    assert Request.from_wire(req.to_wire()) == req
    delta = TokenDelta("r1", [7], "x", finish_reason="stop", num_prompt_tokens=3)
    assert TokenDelta.from_wire(delta.to_wire()) == delta
    event = KVEvent("stored", [2**64 - 1, 5], parent_hash=None)
    assert KVEvent.from_wire(event.to_wire()) == event


def test_wire_rejects_wrong_type_and_extra_fields():
    import msgpack
    with pytest.raises(ValueError):
        Request.from_wire(KVEvent("cleared", []).to_wire())
    bad = msgpack.packb({"type": "kv_event", "kind": "stored", "block_hashes": [], "parent_hash": None,
                         "tier": "device", "evil": 1})
    with pytest.raises(ValueError, match="evil"):
        KVEvent.from_wire(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"seed": "x"}, "seed"),
    ({"stop": [""]}, "stop"),
])
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown sampling parameters"):
        SamplingParams.from_dict({"max_tokens": 3, "temprature": 0.5})


def _full_stats():
    from disagg.protocol import CorruptReason, SourceKind, Tier
    from disagg.stats import WorkerStats
    return WorkerStats(
        steps=7, transfer_seconds=0.25, loaded_blocks={k: i + 1 for i, k in enumerate(SourceKind)},
        tier_query_blocks=3, tier_hit_blocks={Tier.CPU: 4, Tier.DISK: 0}, tier_load_seconds={Tier.CPU: 0.5},
        tier_corrupt={r: i for i, r in enumerate(CorruptReason)}, tier_write_failures=0, tier_store_skipped=1,
        kv_blocks_total=64, kv_blocks_free=60, prefill_s_per_token=0.002, tier_disk_blocks=None,
        tier_load_s_per_block={Tier.CPU: 0.001, Tier.DISK: 0.01})


def test_worker_stats_round_trip_with_every_label_enum_kept():
    from disagg.protocol import CorruptReason, Role, SourceKind, Tier
    from disagg.stats import Heartbeat, WorkerStats
    stats = _full_stats()
    back = WorkerStats.from_wire(stats.to_wire())
    assert back == stats
    assert all(type(k) is SourceKind for k in back.loaded_blocks)
    assert all(type(k) is CorruptReason for k in back.tier_corrupt) and len(back.tier_corrupt) == len(CorruptReason)
    assert all(type(k) is Tier for k in back.tier_load_s_per_block)
    assert type(back.transfer_seconds) is float and back.tier_disk_blocks is None
    for role in Role:
        hb = Heartbeat("w", "i", role, 1, "n", 3, True, 0.5, 0, "w-i", stats=stats)
        again = Heartbeat.from_wire(hb.to_wire())
        assert again == hb and again.role is role and again.stats == stats
    assert Heartbeat.from_wire(Heartbeat("w", "i", Role.BOTH, 1, "n", 0, False, 0.0, 0, "a").to_wire()).stats is None


def test_router_counters_round_trip_with_enum_keys():
    from disagg.protocol import FallbackKind, Role, ServePath
    from disagg.stats import RouterCounters
    c = RouterCounters()
    for path in ServePath:
        c.served(path)
    c.served(ServePath.LOCAL)
    for kind in FallbackKind:
        c.fell_back(kind)
    c.role_changed(Role.PREFILL, Role.DECODE)
    c.role_changed(Role.PREFILL, Role.DECODE)
    c.role_changed(Role.DECODE, Role.BOTH)
    c.migrations = 2
    back = RouterCounters.from_wire(c.to_wire())
    assert back == c and back.paths[ServePath.LOCAL] == 2 and back.role_changes[Role.PREFILL][Role.DECODE] == 2
    assert all(type(k) is ServePath for k in back.paths) and all(type(k) is FallbackKind for k in back.fallbacks)
    assert all(type(k) is Role for k in back.role_changes)


def test_enums_survive_the_wire_in_every_message():
    from disagg.protocol import EventKind, FinishReason, KVEventBatch, PrefillResult, Tier
    delta = TokenDelta.from_wire(TokenDelta("r", [1], finish_reason=FinishReason.LENGTH).to_wire())
    assert delta.finish_reason is FinishReason.LENGTH and str(delta.finish_reason) == "length"
    assert TokenDelta.from_wire(TokenDelta("r", [1], "x", finish_reason="stop").to_wire()).finish_reason is FinishReason.STOP
    assert TokenDelta.from_wire(TokenDelta("r", [1]).to_wire()).finish_reason is None
    result = PrefillResult("r", "a", [1, 2], [Tier.DEVICE, Tier.CPU], 32, 5, finish_reason="abort")
    back = PrefillResult.from_wire(result.to_wire())
    assert back.finish_reason is FinishReason.ABORT and all(type(r) is Tier for r in back.regions)
    assert back.regions == [Tier.DEVICE, Tier.CPU]
    batch = KVEventBatch.of("w", 3, [KVEvent(EventKind.STORED, [1, 2], None, Tier.CPU), KVEvent("cleared", [])])
    events = KVEventBatch.from_wire(batch.to_wire()).kv_events()
    assert events == batch.kv_events()
    assert events[0].kind is EventKind.STORED and events[0].tier is Tier.CPU and events[1].kind is EventKind.CLEARED


@pytest.mark.parametrize("body", [
    {"steps": "many"},  # a string for a count
    {"steps": True},  # a bool is not a count
    {"transfer_seconds": "0.5"},
    {"loaded_blocks": {"carrier_pigeon": 1}},  # an unknown source
    {"tier_hit_blocks": {"gpu": 1}},  # an unknown tier
    {"tier_corrupt": {"checksum": "x"}},
    {"tier_load_s_per_block": [1, 2]},  # a list for a map
    {"kv_blocks_total": None},  # not optional
    {"evil": 1},  # an unknown field
])
def test_worker_stats_garbage_is_rejected_with_the_projects_error(body):
    import msgpack

    from disagg.errors import DisaggError, WireFormatError
    from disagg.stats import WorkerStats
    data = msgpack.unpackb(_full_stats().to_wire())
    data.update(body)
    with pytest.raises(WireFormatError) as info:
        WorkerStats.from_wire(msgpack.packb(data))
    assert isinstance(info.value, DisaggError) and isinstance(info.value, ValueError)


def test_wire_garbage_bytes_and_missing_fields_are_rejected():
    import msgpack

    from disagg.errors import WireFormatError
    from disagg.stats import Heartbeat, RouterCounters
    for payload in (b"\xc1", b"", b"\x92\x01", msgpack.packb({"type": "heartbeat"})):
        with pytest.raises(WireFormatError):
            Heartbeat.from_wire(payload)
    bad_role = msgpack.unpackb(Heartbeat("w", "i", "both", 1, "", 0, False, 0.0, 0, "a").to_wire())
    bad_role["role"] = "janitor"
    with pytest.raises(WireFormatError, match="role"):
        Heartbeat.from_wire(msgpack.packb(bad_role))
    counters = msgpack.unpackb(RouterCounters().to_wire())
    counters["role_changes"] = {"prefill": {"astronaut": 1}}
    with pytest.raises(WireFormatError):
        RouterCounters.from_wire(msgpack.packb(counters))
    with pytest.raises(WireFormatError, match="sampling"):
        Request.from_wire(msgpack.packb({**msgpack.unpackb(Request("r", [1]).to_wire()),
                                         "sampling": {"max_tokens": 0}}))
