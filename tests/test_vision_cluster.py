"""Images through a real cluster (Ray, 1 encoder + 1 prefill + 2 decode workers, HTTP): the answer HF's LLaVA gives,
a repeated image served from the prefix cache, E/PD with a colocated fallback when the encoder is SIGKILLed, a
stream with an image migrated exactly when its decode worker is SIGKILLed, and bad images answered with
OpenAI-style 400 / 413 that lose nothing (disagg/vision/, cluster/encoder.py)."""

import os
import re
import signal
import time

import anthropic
import httpx
import openai
import pytest
import ray
import torch

from disagg.stats import RouterCounters
from tests.imagegen import data_url, png
from tests.waiting import actor_gone, wait_for

PROMPT = "What is in this picture?"
FILES_BETA = "files-api-2025-04-14"  # the beta header Anthropic's Files API asks for (ignored here: always on)


@pytest.fixture(scope="module")
def vlm_service(ray_session, tiny_vlm_dir):
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.router.policy import PolicyConfig
    from disagg.vision.images import ImageLimits

    engine = EngineConfig(model=str(tiny_vlm_dir), kv_cache_memory_mb=32, num_threads=1)
    svc = Service(ClusterConfig(num_prefill=1, num_decode=2, num_encode=1, engine=engine),
                  RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16),
                               images=ImageLimits(max_image_bytes=100_000, max_images_per_request=2)))
    yield svc
    svc.shutdown()


def _chat(url, model, parts, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 8, "temperature": 0,
            **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _parts(*images):
    return [{"type": "text", "text": PROMPT}] + [{"type": "image_url", "image_url": {"url": data_url(i)}}
                                                 for i in images]


def _hf_text(model_dir, images):
    """HF's greedy answer to the same conversation: the template's text with one <image> per image."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from disagg.engine.tokenizer import Tokenizer
    from disagg.vision.spec import VisionSpec
    from tests.imagegen import png as _  # noqa: F401  (same images as the request)

    spec = VisionSpec.from_dir(model_dir)
    ours = Tokenizer.from_dir(model_dir)
    ids = ours.encode_chat([{"role": "user", "content": PROMPT + "<image>" * len(images)}],
                           add_generation_prompt=True)
    expanded = [t for i in ids for t in ([i] * spec.tokens_per_image if i == spec.image_token_id else [i])]
    from io import BytesIO

    from PIL import Image
    pixels = AutoImageProcessor.from_pretrained(str(model_dir))(
        images=[Image.open(BytesIO(i)).convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
    hf = LlavaForConditionalGeneration.from_pretrained(str(model_dir)).float().eval()
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([expanded]), attention_mask=torch.ones(1, len(expanded), dtype=torch.long),
                          pixel_values=pixels, max_new_tokens=8, do_sample=False, pad_token_id=0)
    return AutoTokenizer.from_pretrained(str(model_dir)).decode(out[0, len(expanded):], skip_special_tokens=True)


def _images_metric(url, where):
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf'^disagg:images_total{{encoded="{where}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_an_image_answers_as_hf_and_a_repeat_is_a_prefix_hit(vlm_service, tiny_vlm_dir):
    url, model = vlm_service.url, tiny_vlm_dir.name
    before = _images_metric(url, "encoder")
    first = _chat(url, model, _parts(png(11), png(12)))
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == _hf_text(tiny_vlm_dir, [png(11), png(12)])
    assert _images_metric(url, "encoder") == before + 2  # E/PD: the encoder worker encoded both
    again = _chat(url, model, _parts(png(11), png(12)))
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    usage = again.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16
    other = _chat(url, model, _parts(png(11), png(13))).json()["usage"]  # the second image differs
    assert other["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] - 16


def test_a_killed_encoder_falls_back_to_colocated_encoding(vlm_service, tiny_vlm_dir):
    url, model = vlm_service.url, tiny_vlm_dir.name
    expected = _chat(url, model, _parts(png(21))).json()["choices"][0]["message"]["content"]
    encoder = next(iter(vlm_service.cluster.encode_by_name.values()))
    os.kill(ray.get(encoder.pid.remote()), signal.SIGKILL)
    before = _images_metric(url, "fallback")
    encoded = [s.images_encoded for s in vlm_service.cluster.stats()]  # [prefill, decode, decode]
    answer = _chat(url, model, _parts(png(22)))
    assert answer.status_code == 200, answer.text
    assert _images_metric(url, "fallback") == before + 1
    # the prefill worker encoded it; the decode worker, handed the whole prefill, did not encode it again
    now = [s.images_encoded for s in vlm_service.cluster.stats()]
    assert now[0] == encoded[0] + 1 and sum(now[1:]) == sum(encoded[1:])
    deadline = time.monotonic() + 60  # Ray restarts the encoder; E/PD resumes
    while time.monotonic() < deadline:
        before = _images_metric(url, "encoder")
        reply = _chat(url, model, _parts(png(21)))
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == expected
        if _images_metric(url, "encoder") > before:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the restarted encoder never encoded again")


def test_bad_images_get_openai_errors_and_the_cluster_serves_on(vlm_service, tiny_vlm_dir):
    url, model = vlm_service.url, tiny_vlm_dir.name
    big = png(31, size=(400, 400))  # ~480 KB of noise: over the 100 KB limit
    cases = [
        ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], 400, "remote_image_refused"),
        ([{"type": "image_url", "image_url": {"url": data_url(big)}}], 413, "image_too_large"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], 400, None),
        ([{"type": "image_url", "image_url": {"url": data_url(b"not a picture at all")}}], 400, "invalid_image"),
        (_parts(png(1), png(2), png(3))[1:], 413, "too_many_images"),
        ([{"type": "text", "text": "a typed <image> token"}], 400, None),
        ([{"type": "image_url", "image_url": {"url": 7}}], 400, None),
    ]
    for parts, status, code in cases:
        reply = _chat(url, model, parts)
        assert reply.status_code == status, (parts, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert code is None or error["code"] == code, error
    assert _chat(url, model, _parts(png(32))).status_code == 200


def test_a_messages_image_block_answers_as_the_chat_image_part(vlm_service, tiny_vlm_dir):
    import base64

    url, model = vlm_service.url, tiny_vlm_dir.name
    chat = _chat(url, model, _parts(png(41))).json()
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png(41)).decode()}}
    body = {"model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}, block]}]}
    reply = httpx.post(f"{url}/v1/messages", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    counted = httpx.post(f"{url}/v1/messages/count_tokens", json={k: body[k] for k in ("model", "messages")})
    assert counted.json()["input_tokens"] == chat["usage"]["prompt_tokens"]
    # the image uploaded once with the official client's Files API and named by its id: the same answer
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)
    uploaded = claude.beta.files.upload(file=("cat.png", png(41), "image/png"), betas=[FILES_BETA])
    by_file = {"type": "image", "source": {"type": "file", "file_id": uploaded.id}}
    answer = claude.beta.messages.create(model=model, max_tokens=8, extra_body={"temperature": 0}, betas=[FILES_BETA],
                                         messages=[
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, by_file]}])
    assert answer.content[0].text == chat["choices"][0]["message"]["content"]
    body["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [block]}]
    refused = httpx.post(f"{url}/v1/messages", json=body, timeout=60)
    assert refused.status_code == 400 and refused.json()["type"] == "error"


def test_a_stream_with_an_image_migrates_exactly_when_its_decode_worker_is_killed(vlm_service, tiny_vlm_dir):
    import json

    url, model = vlm_service.url, tiny_vlm_dir.name
    extra = {"max_tokens": 600, "ignore_eos": True}
    reference = _chat(url, model, _parts(png(51)), **extra).json()["choices"][0]["message"]["content"]
    body = {"model": model, "messages": [{"role": "user", "content": _parts(png(51))}], "temperature": 0,
            "stream": True, **extra}
    text, killed = "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            text += chunk["choices"][0]["delta"].get("content") or ""
            if killed is None and text:
                decisions = ray.get(vlm_service.router.decisions.remote(20))
                killed = next(d["decode"] for d in reversed(decisions) if d["request_id"] == chunk["id"])
                os.kill(ray.get(vlm_service.cluster.decode_by_name[killed].pid.remote()), signal.SIGKILL)
    assert killed is not None and text == reference  # no token lost, none repeated
    counters = RouterCounters.from_wire(ray.get(vlm_service.router.health.remote())["counters"])
    assert counters.migrations >= 1  # the stream was still on the killed worker


def test_a_responses_input_image_answers_as_chat_and_a_follow_up_keeps_it(vlm_service, tiny_vlm_dir):
    from openai import OpenAI

    url, model = vlm_service.url, tiny_vlm_dir.name
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    image = data_url(png(61))
    chat = _chat(url, model, _parts(png(61))).json()
    first = client.responses.create(model=model, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": PROMPT},
                                     {"type": "input_image", "image_url": image}]}])
    assert first.output_text == chat["choices"][0]["message"]["content"]
    assert first.usage.input_tokens == chat["usage"]["prompt_tokens"]
    follow = client.responses.create(model=model, max_output_tokens=8, temperature=0, previous_response_id=first.id,
                                     input="And its colours?")
    # the stored turn's image is in the follow-up's prompt again (the same positions: its KV is reused)
    assert follow.usage.input_tokens > first.usage.input_tokens
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16


def test_an_input_image_by_file_id_answers_as_the_inline_image(vlm_service, tiny_vlm_dir):
    """The Files API's upload named by `file_id` (a Responses `input_image`, a chat `file` part) gives the prompt,
    hence the tokens, the inline image gives; the stored turn keeps its own copy, so a follow-up still sees the image after the file is deleted."""
    from openai import OpenAI

    url, model = vlm_service.url, tiny_vlm_dir.name
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chat = _chat(url, model, _parts(png(62))).json()
    upload = client.files.create(file=("cat.png", png(62), "image/png"), purpose="vision")
    first = client.responses.create(model=model, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": PROMPT},
                                     {"type": "input_image", "file_id": upload.id}]}])
    assert first.output_text == chat["choices"][0]["message"]["content"]
    assert first.usage.input_tokens == chat["usage"]["prompt_tokens"]
    by_part = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": PROMPT},
                                     {"type": "file", "file": {"file_id": upload.id}}]}])  # a chat file part
    assert by_part.choices[0].message.content == chat["choices"][0]["message"]["content"]
    listed = client.responses.input_items.list(first.id).data[0].content[1]
    assert (listed.type, listed.file_id) == ("input_image", upload.id)
    client.files.delete(upload.id)
    follow = client.responses.create(model=model, max_output_tokens=8, temperature=0, previous_response_id=first.id,
                                     input="And its colours?")
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16
    with pytest.raises(openai.NotFoundError) as err:  # the deleted file itself is gone
        client.responses.create(model=model, max_output_tokens=8, input=[
            {"role": "user", "content": [{"type": "input_image", "file_id": upload.id}]}])
    assert err.value.body["code"] == "file_not_found" and err.value.body["param"] == "input[0].content[0].file_id"


def test_router_replicas_send_images_to_the_encoders_and_share_uploads(vlm_service, tiny_vlm_dir):
    """Two router replicas behind Ray Serve's proxy, over the same workers: an image request is encoded by the
    encoder worker (the workers receive its rows and encode nothing), the answer is the single router's,
    and a file uploaded through one request is found by the next whichever replica answers (the shared store)."""
    import dataclasses

    from openai import OpenAI

    from disagg.cluster.replicas import ServeFront
    from disagg.http.server import free_port

    model = tiny_vlm_dir.name
    expected = _chat(vlm_service.url, model, _parts(png(71))).json()["choices"][0]["message"]["content"]
    config = dataclasses.replace(vlm_service.router_config, replicas=2, port=free_port("127.0.0.1"), runtime_key="")
    front = ServeFront(config)
    cluster = vlm_service.cluster
    try:
        url = front.start(list(cluster.prefill_by_name), list(cluster.decode_by_name))
        def counts():
            stats = cluster.stats()
            return sum(s.images_encoded for s in stats), sum(s.images_received for s in stats)

        encoded, received = counts()
        for seed in (72, 73):  # new images: neither is a prefix hit
            reply = _chat(url, model, _parts(png(seed)))
            assert reply.status_code == 200, reply.text
        now_encoded, now_received = counts()
        assert now_encoded == encoded and now_received >= received + 2  # the encoder worker encoded them
        assert _chat(url, model, _parts(png(71))).json()["choices"][0]["message"]["content"] == expected
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ids = [client.files.create(file=(f"{i}.png", png(71), "image/png"), purpose="vision").id for i in range(4)]
        for file_id in ids:  # the proxy spreads these over both replicas
            answer = client.responses.create(model=model, max_output_tokens=8, temperature=0, input=[
                {"role": "user", "content": [{"type": "input_text", "text": PROMPT},
                                             {"type": "input_image", "file_id": file_id}]}])
            assert answer.output_text == expected
        assert sorted(f.id for f in client.files.list()) == sorted(ids)
    finally:
        front.shutdown()


def _encoders_listed(url, model):
    try:
        listing = httpx.get(f"{url}/admin/models", timeout=10).json()["models"]
    except httpx.HTTPError:  # a restarted router not listening yet
        return None
    return next((m["encoders"] for m in listing if m["id"] == model), None)


def _router_pid(service):
    try:
        return ray.get(service.router.pid.remote(), timeout=5)
    except (ray.exceptions.RayError, TimeoutError):  # being restarted
        return None


def test_a_deployment_s_vlm_sends_its_images_to_its_own_encoder_and_one_loaded_at_run_time_too(
    vlm_service, tiny_vlm_dir, smollm_dir
):
    """Two models behind one router, the tiny LLaVA with an encoder worker of its own and a text model: the VLM's
    images are encoded there (the same answer as the single-model cluster), the text model serves on.  Unloaded, the
    VLM's encoder ends with it; loaded again at run time with `encode`, it gets one of its own, which its images go
    to, and which a restarted router keeps using (it is not ended as a stray)."""
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.models.deployment import deployment_of

    expected = _chat(vlm_service.url, tiny_vlm_dir.name, _parts(png(81))).json()["choices"][0]["message"]["content"]
    engine = {"kv_cache_memory_mb": 32, "num_threads": 1}
    deployment = deployment_of({"models": [
        {"id": "vlm", "path": str(tiny_vlm_dir), "prefill": 0, "decode": 1, "encode": 1},
        {"id": "text", "path": str(smollm_dir), "prefill": 0, "decode": 1, "engine": {"max_model_len": 512}}]},
        EngineConfig(**engine))
    service = Service(ClusterConfig(), RouterConfig(), deployment=deployment, name_prefix="dep-")
    url = service.url
    try:
        assert [len(c.encode_by_name) for c in service.clusters.values()] == [1, 0]
        reply = _chat(url, "vlm", _parts(png(81)))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
        assert _images_metric(url, "encoder") == 1  # its own encoder encoded it
        text = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "text", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert text.status_code == 200, text.text

        (first,) = _encoders_listed(url, "vlm")
        assert first == next(iter(service.clusters["vlm"].encode_by_name))
        assert httpx.delete(f"{url}/admin/models/vlm", timeout=60).status_code == 200
        wait_for(lambda: actor_gone(first))  # an unloaded model's encoder worker ends with it

        body = {"id": "vlm-b", "path": str(tiny_vlm_dir), "prefill": 0, "decode": 1, "encode": 1, "engine": engine}
        loaded = httpx.post(f"{url}/admin/models", json=body, timeout=120)
        assert loaded.status_code == 201, loaded.text
        (second,) = _encoders_listed(url, "vlm-b")
        reply = _chat(url, "vlm-b", _parts(png(81)))
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == expected
        assert _images_metric(url, "encoder") == 2  # the loaded model's own encoder encoded it

        router_pid = _router_pid(service)
        os.kill(router_pid, signal.SIGKILL)
        wait_for(lambda: _router_pid(service) not in (None, router_pid))
        assert wait_for(lambda: _encoders_listed(url, "vlm-b")) == [second]  # served again over the same encoder
        reply = _chat(url, "vlm-b", _parts(png(82)))
        assert reply.status_code == 200, reply.text
        assert _images_metric(url, "encoder") == 1  # the restarted router's counter: there, not colocated
    finally:
        service.shutdown()
    wait_for(lambda: actor_gone(second))  # the shutdown ends a run-time model's encoder worker too
