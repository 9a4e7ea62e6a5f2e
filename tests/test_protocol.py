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
