"""Bench workloads: loader round-trips, hash_id -> tokens determinism and prefix consistency, agent sessions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.workload import agent, loaders
from disagg.workload.record import TraceRequest, TraceScale
from disagg.workload.tokens import block_tokens, prompt_tokens

REPO = Path(__file__).resolve().parents[1]


def test_mooncake_jsonl_round_trip(tmp_path):
    trace = loaders.load("mooncake_conversation_trace.jsonl", limit=200)
    assert len(trace) == 200 and trace[0].hash_ids[:3] == [0, 1, 2] and trace[0].input_length == 6758
    loaders.write_jsonl(trace, tmp_path / "t.jsonl")
    assert loaders.load(tmp_path / "t.jsonl") == trace
    synthetic = loaders.load("mooncake_synthetic_trace.jsonl", limit=50)
    assert all(len(r.hash_ids) == -(-r.input_length // 512) for r in synthetic)


def test_agent_trace_round_trips_with_session_fields(tmp_path):
    trace = agent.generate({"coding_agent": 1, "short_chat": 1}, 6, 1.0, seed=3)
    loaders.write_jsonl(trace, tmp_path / "a.jsonl")
    back = loaders.load(tmp_path / "a.jsonl")
    assert back == trace and all(r.session_id and r.turn is not None for r in back)


def test_csv_round_trip_with_header_and_without(tmp_path):
    trace = [TraceRequest(0, 100, 20), TraceRequest(250.5, 3000, 7), TraceRequest(1000, 1, 1)]
    loaders.write_csv(trace, tmp_path / "t.csv")
    assert loaders.load(tmp_path / "t.csv") == trace
    (tmp_path / "plain.csv").write_text("0,100,20\n250.5,3000,7\n1000,1,1\n")
    assert loaders.load(tmp_path / "plain.csv") == trace
    (tmp_path / "named.csv").write_text("arrival_time,prompt_tokens,completion_tokens\n5,10,2\n")
    assert loaders.load(tmp_path / "named.csv") == [TraceRequest(5, 10, 2)]


@pytest.mark.parametrize("text,match", [("timestamp,foo,bar\n1,2,3\n", "no input column"),
                                        ("0,abc,3\n", "bad row")])
def test_bad_csv_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        loaders.load(tmp_path / "bad.csv")


AZURE_2023 = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.0000000,879,31
"""
AZURE_2024 = """TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-10 00:00:00.009930+00:00,2162,5
2024-05-10 00:00:00.054988+00:00,2399,8
2024-05-10 00:00:01.204988+00:00,198,12
"""
BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,357,1444,Conversation log
46.5,GPT-4,200,0,200,API log
118,GPT-4,417,276,693,API log
"""


def test_azure_traces_load_with_datetime_timestamps(tmp_path):
    (tmp_path / "AzureLLMInferenceTrace_conv.csv").write_text(AZURE_2023)
    trace = loaders.load(tmp_path / "AzureLLMInferenceTrace_conv.csv")
    assert [(r.input_length, r.output_length) for r in trace] == [(374, 44), (396, 109), (879, 31)]
    assert [round(r.timestamp_ms, 3) for r in trace] == [0.0, 4314.579, 4319.41]  # ms from the first request
    (tmp_path / "AzureLLMInferenceTrace_code_1week.csv").write_text(AZURE_2024)
    trace = loaders.load(tmp_path / "AzureLLMInferenceTrace_code_1week.csv")
    assert [round(r.timestamp_ms, 3) for r in trace] == [0.0, 45.058, 1195.058]
    assert [r.input_length for r in trace] == [2162, 2399, 198] and trace[0].hash_ids == []


def test_burstgpt_loads_in_seconds_and_skips_failed_requests(tmp_path):
    (tmp_path / "BurstGPT_1.csv").write_text(BURSTGPT)
    trace = loaders.load(tmp_path / "BurstGPT_1.csv")
    assert [(r.timestamp_ms, r.input_length, r.output_length) for r in trace] == \
        [(0.0, 472, 18), (40000.0, 1087, 357), (113000.0, 417, 276)]


def test_azure_and_burstgpt_traces_run_through_the_bench_cli(tmp_path):
    for name, text in (("azure.csv", AZURE_2024), ("burst.csv", BURSTGPT)):
        (tmp_path / name).write_text(text)
        out = subprocess.run([sys.executable, "-m", "disagg.cli", "bench", "simulate", "--trace",
                              str(tmp_path / name), "--rates", "1", "--configs", "agg-kv=0x2:kv", "--no-progress",
                              "--out", str(tmp_path / name[:-4])], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads((tmp_path / name[:-4] / "result.json").read_text())
        assert result["workload"]["requests"] == 3
        assert result["runs"][0]["metrics"]["completed"] == 3


@pytest.mark.parametrize("name,text", [("t.parquet", "PAR1"), ("t.jsonl", '{"ts": 1, "prompt": "hi"}\n'),
                                       ("t.csv", "when,model,tokens\n1,a,2\n")])
def test_unknown_format_lists_the_supported_ones(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="supported trace formats") as err:
        loaders.load(tmp_path / name)
    assert all(f.value in str(err.value) for f in loaders.TraceFormat)


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*lacks"):
        loaders.load(tmp_path / "bad.jsonl")


def test_missing_trace_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no trace"):
        loaders.load("no_such_trace.jsonl")


def test_block_tokens_are_deterministic_across_processes():
    here = block_tokens(12345, 16, 49152)
    code = "from disagg.workload.tokens import block_tokens; print(block_tokens(12345, 16, 49152))"
    there = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert there.stdout.strip() == str(here)
    assert block_tokens(12346, 16, 49152) != here
    assert all(256 <= t < 49152 for t in here)
    assert all(256 <= t < 512 for t in block_tokens(7, 64, 512))  # a tiny vocabulary keeps clear of low ids


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 2**40), min_size=1, max_size=12), cut=st.integers(1, 16), extra=st.integers(0, 5))
def test_prompts_sharing_hash_ids_share_exactly_their_token_prefix(ids, cut, extra):
    n = (len(ids) - 1) * 16 + cut
    a = prompt_tokens(ids, n, 16, 49152)
    assert len(a) == n  # the last block is cut to the input length
    longer = ids + [2**41 + i for i in range(extra)]
    b = prompt_tokens(longer, len(longer) * 16, 16, 49152)
    assert b[:n] == a  # same leading ids -> same leading tokens
    if extra:
        assert b[len(ids) * 16:] != prompt_tokens([2**42] * extra, extra * 16, 16, 49152)


def test_prompt_without_hash_ids_is_unique_per_salt():
    assert prompt_tokens([], 30, 16, 49152, salt=1) == prompt_tokens([], 30, 16, 49152, salt=1)
    assert prompt_tokens([], 30, 16, 49152, salt=1) != prompt_tokens([], 30, 16, 49152, salt=2)
    with pytest.raises(ValueError):
        prompt_tokens([1], 17, 16, 49152)


def test_scale_maps_lengths_and_times():
    req = TraceRequest(4000, input_length=6758, output_length=500, hash_ids=list(range(14)))
    s = TraceScale(block_tokens=16, time_scale=2.0)
    assert s.input_len(req) == 212  # ceil(6758 / 32)
    assert s.output_len(req) == 16  # round(500 / 32)
    assert s.seconds(req.timestamp_ms) == 2.0
    assert len(s.prompt(req, 49152)) == 212
    capped = TraceScale(block_tokens=16, output_scale=1.0, max_input_tokens=100, max_output_tokens=64)
    assert capped.input_len(req) == 100 and capped.output_len(req) == 64
    assert capped.prompt(req, 49152) == s.prompt(req, 49152)[:100]
    with pytest.raises(ValueError):
        TraceScale(time_scale=0)


def test_agent_sessions_are_deterministic_and_grow():
    a = agent.generate({"coding_agent": 1, "deep_research": 1, "short_chat": 1}, 12, 0.5, seed=7)
    assert a == agent.generate({"coding_agent": 1, "deep_research": 1, "short_chat": 1}, 12, 0.5, seed=7)
    assert a != agent.generate({"coding_agent": 1, "deep_research": 1, "short_chat": 1}, 12, 0.5, seed=8)
    sessions: dict[str, list[TraceRequest]] = {}
    for r in a:
        sessions.setdefault(r.session_id, []).append(r)
    assert len(sessions) == 12
    system = {}
    for sid, turns in sessions.items():
        turns.sort(key=lambda r: r.turn)
        profile = agent.PROFILES[sid.split("-")[0]]
        assert [t.turn for t in turns] == list(range(len(turns)))
        assert turns[0].think_time_ms == 0 and all(t.think_time_ms > 0 for t in turns[1:])
        full_system = profile.system_tokens // 512
        system.setdefault(profile.name, turns[0].hash_ids[:full_system])
        assert turns[0].hash_ids[:full_system] == system[profile.name]  # shared across sessions
        for prev, cur in zip(turns, turns[1:]):
            assert cur.input_length > prev.input_length + prev.output_length  # output + tool result appended
            assert cur.input_length < profile.max_context_tokens
            full = prev.input_length // 512
            assert cur.hash_ids[:full] == prev.hash_ids[:full]  # full blocks keep their identity
            if prev.input_length % 512:
                assert cur.hash_ids[full] != prev.hash_ids[full]  # the partial block's content changed
            assert cur.timestamp_ms == pytest.approx(prev.timestamp_ms + cur.think_time_ms, abs=0.01)
            assert len(cur.hash_ids) == -(-cur.input_length // 512)
    other_sessions = [s for s in sessions.values() if s[0].session_id.startswith("coding_agent")]
    if len(other_sessions) >= 2:
        a_ids, b_ids = set(other_sessions[0][-1].hash_ids), set(other_sessions[1][-1].hash_ids)
        assert a_ids & b_ids == set(system["coding_agent"])  # only the system prompt is shared


def test_agent_rejects_unknown_profiles():
    with pytest.raises(ValueError, match="unknown agent profile"):
        agent.generate({"chatty": 1}, 2, 1.0)
    assert agent.parse_mix("coding_agent:2, short_chat") == {"coding_agent": 2.0, "short_chat": 1.0}


def test_agent_cli_writes_a_replayable_trace(tmp_path):
    out = tmp_path / "agent.jsonl"
    assert agent.main(["--profile", "deep_research", "--sessions", "3", "--out", str(out)]) == 0
    assert loaders.load(out) == agent.generate({"deep_research": 1}, 3, 0.5, seed=0)
