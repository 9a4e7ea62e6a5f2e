"""`ray job submit` against a local `ray start --head` cluster runs the launch entrypoint and serves a request."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STOP_GRACE_S = 3


@pytest.fixture
def head():
    gcs, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    # --block keeps the head in this process group, so teardown stops this cluster and nothing else.
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/version", timeout=2).status_code in (200, 401):
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("ray head did not come up")
    yield url, env
    os.killpg(proc.pid, 15)
    try:  # `ray start --block` takes ~30 s to wind its processes down; the whole group goes after a short grace
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


# the dashboard answers before the head's job agent has registered; until it has, a submission is refused (HTTP
# 500, nothing started) with this message, which asks to try again
NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S = 60


def test_ray_job_submit_serves_a_chat_request(head, smollm_dir):
    url, env = head
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--",
                              "python", "-m", "disagg.cluster.launch", "--port", "0", "--kv-cache-mb", "128",
                              "--model", str(smollm_dir), "--smoke-test"],
                             env=env, capture_output=True, text=True, timeout=400)
        log = out.stdout + out.stderr
        if out.returncode == 0 or NO_AGENT_YET not in log or time.monotonic() > deadline:
            break
        time.sleep(1)  # the agent registers within seconds of the head
    assert out.returncode == 0, log[-3000:]
    assert "disagg serving" in log and "finish=stop" in log and "Paris" in log
    assert "succeeded" in log
