"""E/PD without an encoder worker of its own (`--encode-on-prefill 1`): a real cluster of 2 prefill workers, the
first of which also encodes the images of requests prefilled on either, and 1 decode worker (Ray, HTTP).  The
answer is HF's; the images are counted as an encoder's and on the encoding worker's own figures; SIGKILLed, that
worker's images are encoded colocated (its call failed, or the router had it dead and made none) and it encodes
again once Ray has restarted it.  Bad settings (more encoding prefill workers than prefill workers, a text model)
are refused before any worker starts, and the router gives no images to an encoding worker it has dead."""

import os
import signal
import time

import pytest
import ray

from disagg.models.deployment import DeploymentError, ModelEntry, model_spec
from tests.imagegen import png
from tests.test_vision_cluster import _chat, _hf_text, _images_metric, _parts


@pytest.fixture(scope="module")
def shared_service(ray_session, tiny_vlm_dir):
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.router.policy import PolicyConfig

    engine = EngineConfig(model=str(tiny_vlm_dir), kv_cache_memory_mb=32, num_threads=1)
    svc = Service(ClusterConfig(num_prefill=2, num_decode=1, encode_on_prefill=1, engine=engine),
                  RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)))
    yield svc
    svc.shutdown()


def _as_encoder(svc, name):
    by_name = dict(zip(svc.cluster.workers_by_name, svc.cluster.stats()))
    return by_name[name].images_encoded_as_encoder


def test_a_prefill_worker_encodes_for_the_others_and_the_answer_is_hf_s(shared_service, tiny_vlm_dir):
    svc, model = shared_service, tiny_vlm_dir.name
    assert not svc.cluster.encode_by_name  # no encoder worker: the first prefill worker encodes
    assert list(svc.cluster.encoders_by_name) == list(svc.cluster.prefill_by_name)[:1]
    encoding = next(iter(svc.cluster.encoders_by_name))
    before, encoded = _images_metric(svc.url, "encoder"), _as_encoder(svc, encoding)
    reply = _chat(svc.url, model, _parts(png(71), png(72)))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == _hf_text(tiny_vlm_dir, [png(71), png(72)])
    assert _images_metric(svc.url, "encoder") == before + 2
    assert _as_encoder(svc, encoding) == encoded + 2
    # the other prefill worker serves text as any prefill worker does: prompts go to both
    for i in range(6):
        text = _chat(svc.url, model, [{"type": "text", "text": f"Count to {i + 3}. " * 6}])
        assert text.status_code == 200, text.text


def test_the_encoding_prefill_worker_killed_falls_back_then_encodes_again(shared_service, tiny_vlm_dir):
    svc, model = shared_service, tiny_vlm_dir.name
    expected = _chat(svc.url, model, _parts(png(81))).json()["choices"][0]["message"]["content"]
    encoding = next(iter(svc.cluster.encoders_by_name.values()))
    os.kill(ray.get(encoding.pid.remote()), signal.SIGKILL)
    deadline, away, encoded = time.monotonic() + 90, False, False
    while time.monotonic() < deadline and not encoded:
        before = {where: _images_metric(svc.url, where) for where in ("fallback", "colocated", "encoder")}
        reply = _chat(svc.url, model, _parts(png(81)))
        assert reply.status_code == 200, reply.text  # never lost: encoded colocated while the worker is away
        assert reply.json()["choices"][0]["message"]["content"] == expected
        # its call failed (fallback), or the router already had it dead and never called it (colocated)
        away |= any(_images_metric(svc.url, w) > before[w] for w in ("fallback", "colocated"))
        encoded = _images_metric(svc.url, "encoder") > before["encoder"] and away
        time.sleep(0.3)
    assert away and encoded, "the killed worker's images were never encoded without it, or it never encoded again"


class _NoWorker:
    """An actor class that fails the test if a worker is started."""

    @staticmethod
    def options(**_):
        raise AssertionError("a worker was started before its settings were checked")


def test_bad_settings_are_refused_before_any_worker_starts(ray_session, tiny_vlm_dir, smollm_dir, monkeypatch):
    from disagg.cluster import pools
    from disagg.cluster.launch import ClusterConfig
    from disagg.config import EngineConfig

    for cls in ("PrefillWorker", "DecodeWorker", "AggregatedWorker", "EncoderWorker"):
        monkeypatch.setattr(pools, cls, _NoWorker)
    vlm, text = EngineConfig(model=str(tiny_vlm_dir)), EngineConfig(model=str(smollm_dir))
    with pytest.raises(ValueError, match="of 1 prefill"):
        pools.LocalCluster(ClusterConfig(num_prefill=1, encode_on_prefill=2, engine=vlm))
    with pytest.raises(ValueError, match="not a vision-language model"):
        pools.LocalCluster(ClusterConfig(num_prefill=1, encode_on_prefill=1, engine=text))
    with pytest.raises(ValueError, match="not a vision-language model"):
        pools.LocalCluster(ClusterConfig(num_prefill=1, num_encode=1, engine=text))
    with pytest.raises(DeploymentError, match="encode_on_prefill"):
        model_spec(ModelEntry(id="v", path=str(tiny_vlm_dir), prefill=1, encode_on_prefill=2))
    with pytest.raises(DeploymentError, match="encode_on_prefill"):
        model_spec(ModelEntry(id="t", path=str(smollm_dir), prefill=1, encode_on_prefill=1))
    assert model_spec(ModelEntry(id="v", path=str(tiny_vlm_dir), prefill=2, encode_on_prefill=1)).encode_on_prefill == 1


class _Port:
    async def encode(self, batch: bytes) -> bytes:
        return batch


def test_the_router_gives_no_images_to_an_encoding_worker_its_health_monitor_has_dead(tiny_vlm_dir):
    """How serve_model wires the encode stage to the model's health monitor: a prefill worker that encodes too is
    skipped while dead; an encoder worker (not one of the model's workers, not monitored) is always tried."""
    from disagg.cluster.router_service import ModelRoute, RouterConfig, serve_model

    route = ModelRoute("v", str(tiny_vlm_dir), 16, 2048, ["p0", "p1"], ["d0"], encoders=["p0", "enc"])
    served = serve_model(RouterConfig(), route, {"p0": None, "p1": None}, {"d0": None},
                         {"p0": _Port(), "enc": _Port()})
    stage = served.encode
    assert stage is not None and stage.usable("p0") and stage.usable("enc")
    served.core.health.take_out("p0", "a test")
    assert not stage.usable("p0") and stage.usable("enc")
