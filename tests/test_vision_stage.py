"""The encoder stage's rule and faults with fake encoder ports (disagg/vision/stage.py), and the front door's
image checks that need no cluster (disagg/vision/images.py, http/images.py)."""

import asyncio

import pytest

from disagg.errors import InvalidRequest, PayloadTooLarge, WorkerLost
from disagg.http.images import load_images
from disagg.http.models import ServedModel
from disagg.protocol import EncodeBatch, ImageInput, Request
from disagg.vision.images import ImageLimits, check_image, content_hash, decode_data_url
from disagg.vision.stage import Encoded, EncodeConfig, EncodeStage
from tests.imagegen import data_url, png

HIDDEN = 8


class FakeEncoder:
    def __init__(self, answer="rows", delay_s=0.0):
        self.answer, self.delay_s, self.calls = answer, delay_s, 0

    async def encode(self, batch: bytes) -> bytes:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.answer == "lost":
            raise WorkerLost("encoder gone")
        if self.answer == "garbage":
            return b"\xc1not msgpack"
        images = EncodeBatch.from_wire(batch).images
        width = HIDDEN * 4 if self.answer == "rows" else HIDDEN * 2  # "short": rows of the wrong size
        return EncodeBatch([ImageInput(i.content_hash, i.offset, i.num_tokens, embedding=b"\0" * width * i.num_tokens)
                            for i in images]).to_wire()


def _request(tokens=16, n=1):
    images = [ImageInput(content_hash(png(i)), 10 * i, tokens, data=png(i)) for i in range(n)]
    return Request("r", [1] * 64, images=images)


def test_images_go_to_the_least_busy_encoder_and_come_back_as_rows():
    ports = {"a": FakeEncoder(delay_s=0.05), "b": FakeEncoder(delay_s=0.05)}
    stage = EncodeStage(ports, HIDDEN, EncodeConfig(max_inflight_per_encoder=1))

    async def three():
        return await asyncio.gather(*(stage.attach(r) for r in requests))

    requests = [_request() for _ in range(3)]
    outcomes = asyncio.run(three())
    # one each for a and b; the third finds both full and stays colocated
    assert sorted(o.value for o in outcomes) == ["colocated", "encoder", "encoder"]
    assert ports["a"].calls == ports["b"].calls == 1
    done = [r for r, o in zip(requests, outcomes) if o is Encoded.ENCODER]
    assert all(i.embedding and not i.data for r in done for i in r.images)


def test_image_light_requests_are_encoded_colocated():
    stage = EncodeStage({"a": FakeEncoder()}, HIDDEN, EncodeConfig(remote_min_image_tokens=64))
    assert asyncio.run(stage.attach(_request(tokens=16, n=2))) is Encoded.COLOCATED
    assert asyncio.run(stage.attach(_request(tokens=16, n=4))) is Encoded.ENCODER
    assert asyncio.run(EncodeStage({}, HIDDEN, EncodeConfig()).attach(_request())) is Encoded.COLOCATED


@pytest.mark.parametrize("answer", ["lost", "garbage", "short"])
def test_a_failing_encoder_leaves_the_images_to_the_prefill_worker(answer):
    request = _request(n=2)
    stage = EncodeStage({"a": FakeEncoder(answer)}, HIDDEN, EncodeConfig())
    assert asyncio.run(stage.attach(request)) is Encoded.FALLBACK
    assert all(i.data and not i.embedding for i in request.images) and stage.inflight == {"a": 0}


def test_a_slow_encoder_times_out_into_a_fallback_and_keeps_its_slot_until_it_answers():
    stage = EncodeStage({"a": FakeEncoder(delay_s=0.5)}, HIDDEN, EncodeConfig(timeout_s=0.05, max_inflight_per_encoder=1))

    async def run():
        first = await stage.attach(_request())
        second = await stage.attach(_request())  # the encoder is still busy with the first: not sent there
        busy = dict(stage.inflight)
        await asyncio.sleep(0.6)
        return first, second, busy

    first, second, busy = asyncio.run(run())
    assert (first, second, busy) == (Encoded.FALLBACK, Encoded.COLOCATED, {"a": 1}) and stage.inflight == {"a": 0}


def test_image_checks_name_the_limit():
    limits = ImageLimits(max_image_bytes=2000, max_image_pixels=60 * 60)
    with pytest.raises(PayloadTooLarge, match="2000 bytes"):
        decode_data_url(data_url(png(1, size=(200, 200))), limits, "messages")
    with pytest.raises(PayloadTooLarge, match="3600 pixels"):  # a small file of many pixels: refused by its header
        check_image(_flat_png(4000, 1), limits, "messages")
    with pytest.raises(InvalidRequest, match="could not be decoded"):
        check_image(png(1)[:40], ImageLimits(), "messages")  # a truncated PNG
    jpeg = _encoded("JPEG", (64, 64))
    check_image(jpeg, ImageLimits(), "messages")
    for bad in (jpeg[: len(jpeg) * 2 // 3], _encoded("BMP", (8, 8)), _encoded("TIFF", (8, 8))):
        with pytest.raises(InvalidRequest, match="could not be decoded"):  # truncated; formats not accepted
            check_image(bad, ImageLimits(), "messages")


def _encoded(fmt, size):
    import io

    import numpy as np
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def _flat_png(width, height):
    import io

    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def test_a_text_only_model_refuses_images():
    served = ServedModel("text-only", core=None, tokenizer=None, max_model_len=128)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="takes no images"):
        asyncio.run(load_images([data_url(png(1))], served, ImageLimits(), "messages"))


@pytest.fixture(scope="module")
def image_server():
    """A loopback HTTP server: /ok.png, /big.png (over the limit below), /slow.png (answers after 2 s), /gone."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = {"/ok.png": png(1), "/big.png": png(2, size=(300, 300)), "/slow.png": png(3)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            if self.path not in files:
                self.send_error(404)
                return
            if self.path == "/slow.png":
                time.sleep(2)
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(files[self.path])))
                self.end_headers()
                self.wfile.write(files[self.path])
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow one): expected
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()


def test_remote_images_are_fetched_only_when_allowed_within_size_and_time(image_server):
    from disagg.http.images import load_image

    base, files = image_server
    with pytest.raises(InvalidRequest, match="not a public address"):  # the server's own network: refused
        asyncio.run(load_image(f"{base}/ok.png", ImageLimits(fetch_remote_images=True), "messages"))
    on = ImageLimits(fetch_remote_images=True, fetch_private_hosts=True, max_image_bytes=50_000, fetch_timeout_s=0.5)
    loaded = asyncio.run(load_image(f"{base}/ok.png", on, "messages"))
    assert loaded.data == files["/ok.png"] and loaded.content_hash == content_hash(files["/ok.png"])
    with pytest.raises(InvalidRequest, match="not fetched"):
        asyncio.run(load_image(f"{base}/ok.png", ImageLimits(), "messages"))  # off by default
    with pytest.raises(PayloadTooLarge, match="50000 bytes"):
        asyncio.run(load_image(f"{base}/big.png", on, "messages"))
    with pytest.raises(InvalidRequest, match="could not be fetched"):
        asyncio.run(load_image(f"{base}/slow.png", on, "messages"))
    with pytest.raises(InvalidRequest, match="HTTP 404"):
        asyncio.run(load_image(f"{base}/gone", on, "messages"))
    with pytest.raises(InvalidRequest, match="could not be fetched"):
        asyncio.run(load_image("http://[::1", on, "messages"))  # not a URL httpx can parse


def test_vision_specs_of_published_configs():
    """llava-1.5 (llava-hf) writes only what differs from HF's defaults; SigLIP towers have no class token, and
    "default" drops the first row whatever it is (HF's LlavaModel)."""
    from disagg.vision.spec import VisionSpec, text_config

    llava15 = {"model_type": "llava", "image_token_index": 32000, "vision_feature_select_strategy": "default",
               "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "vocab_size": 32064},
               "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}}
    assert VisionSpec.from_config(llava15) == VisionSpec(32000, 576, 4096, 32064)
    assert text_config(llava15)["num_hidden_layers"] == 32 and text_config(llava15)["max_position_embeddings"] == 4096
    siglip = {**llava15, "vision_config": {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14}}
    assert VisionSpec.from_config(siglip).tokens_per_image == 27 * 27 - 1
    full = {**siglip, "vision_feature_select_strategy": "full"}
    assert VisionSpec.from_config(full).tokens_per_image == 27 * 27
    assert VisionSpec.from_config({"model_type": "llama"}) is None


def test_an_encoder_the_router_has_dead_gets_no_images():
    """A prefill worker that encodes too (--encode-on-prefill) and that the health monitor has dead: its requests
    would wait the encoder timeout for nothing, so they go to another encoder, or are encoded colocated."""
    ports = {"a": FakeEncoder(), "b": FakeEncoder()}
    dead = {"a"}
    stage = EncodeStage(ports, HIDDEN, EncodeConfig(), usable=lambda name: name not in dead)
    assert asyncio.run(stage.attach(_request())) is Encoded.ENCODER and ports["a"].calls == 0 and ports["b"].calls == 1
    dead.add("b")
    assert asyncio.run(stage.attach(_request())) is Encoded.COLOCATED and ports["b"].calls == 1
    dead.clear()
    assert asyncio.run(stage.attach(_request())) is Encoded.ENCODER
