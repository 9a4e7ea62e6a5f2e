"""The Files API (http/files.py, http/file_store.py, http/file_shapes.py): the pure store's limits, expiry and
tenants; the real app over real HTTP (Starlette's TestClient) driven by the official `openai` client - upload, list,
retrieve, content, delete, each tenant seeing its own files only - and uploads that break the rules answered with
OpenAI-style 4xx; the same files through the official `anthropic` client in Anthropic's shapes (the app served by
uvicorn).  Images named by file are tests/test_file_images.py's."""
import asyncio
import datetime
from types import SimpleNamespace

import anthropic
import openai
import pytest
from starlette.testclient import TestClient

from disagg.errors import NotFound, PayloadTooLarge
from disagg.http.file_store import OCTET_STREAM, FilePurpose, FileStore, FileStoreConfig, StoredFile
from tests.files_fakes import Clock
from tests.imagegen import png

ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"


def _file(data=b"x" * 10, name="a.png"):
    return StoredFile.new(name, FilePurpose.VISION, data)


def test_the_store_refuses_past_its_limits_and_drops_nothing_to_make_room():
    store = FileStore(FileStoreConfig(max_file_bytes=100, max_bytes_per_tenant=250, max_per_tenant=3), Clock())
    with pytest.raises(PayloadTooLarge) as err:
        store.put("a", _file(b"x" * 101))
    assert err.value.code == "file_too_large" and "100 bytes" in err.value.message
    kept = [store.put("a", _file(b"x" * 100)).file_id for _ in range(2)]
    with pytest.raises(PayloadTooLarge) as err:
        store.put("a", _file(b"x" * 60))  # 260 bytes would be over 250
    assert err.value.code == "file_storage_full"
    store.put("a", _file(b"x" * 50))
    with pytest.raises(PayloadTooLarge):  # a fourth file, though it would fit in bytes
        store.put("a", _file(b""))
    assert all(store.get("a", i) for i in kept)  # nothing of the tenant's was dropped for the refused uploads
    store.put("b", _file(b"x" * 100))  # another tenant's quota is its own
    with pytest.raises(PayloadTooLarge):  # a file built with a wrong size is counted by the bytes it holds
        store.put("c", StoredFile("file-x", "x", FilePurpose.VISION, b"x" * 101, size=0))
    store.delete("a", kept[0])
    store.put("a", _file(b"x" * 100))  # deleting makes room


def test_files_expire_at_their_own_time_and_tenants_see_only_their_own():
    clock = Clock()
    store = FileStore(FileStoreConfig(ttl_s=7200), clock)
    short = store.put("a", _file(), expires_after_s=3600)
    long = store.put("a", _file(), expires_after_s=10**9)  # asked for more than the server keeps: its ttl
    assert (short.expires_at - short.created_at, long.expires_at - long.created_at) == (3600, 7200)
    with pytest.raises(NotFound) as err:
        store.get("b", short.file_id, "input[0]")  # another tenant's: the same answer as an unknown id
    assert (err.value.code, err.value.param) == ("file_not_found", "input[0]")
    clock.now += 3600
    assert [f.file_id for f in store.listed("a")] == [long.file_id]
    with pytest.raises(NotFound):
        store.get("a", short.file_id)
    clock.now += 3600
    assert len(store) == 0 and store._by_tenant == {}  # no empty entry is left per tenant


def test_a_file_s_content_is_served_as_its_bytes_never_as_the_type_its_uploader_declared(app):
    alice = _client(app, ALICE)
    page = alice.files.create(file=("x.html", b"<script>alert(1)</script>", "text/html"), purpose="user_data")
    image = alice.files.create(file=("cat.svg", png(9, size=(16, 16)), "image/svg+xml"), purpose="vision")  # a PNG
    for file_id, served in ((page.id, "application/octet-stream"), (image.id, "image/png")):
        reply = TestClient(app).get(f"/v1/files/{file_id}/content", headers={"authorization": f"Bearer {ALICE}"})
        assert reply.headers["content-type"] == served
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["content-disposition"] == "attachment"
        alice.files.delete(file_id)
    for declared, kept in (("Text/Plain; charset=utf-8", "text/plain"), ("<b>/x", OCTET_STREAM), ("", OCTET_STREAM)):
        assert StoredFile.new("a", FilePurpose.USER_DATA, b"x", declared).mime_type == kept


def test_a_stored_file_travels_as_msgpack_with_its_bytes_and_purpose():
    stored = FileStore(clock=Clock()).put("a", _file(bytes(range(256))))
    back = StoredFile.from_wire(stored.to_wire())
    assert back == stored and back.purpose is FilePurpose.VISION


@pytest.fixture(scope="module")
def app(tiny_llama_dir, smollm_dir):
    from disagg.engine.tokenizer import Tokenizer
    from disagg.http.app import build_app
    from disagg.http.config import ApiConfig
    from disagg.http.models import ModelTable
    from disagg.router.policy import PolicyConfig
    from disagg.router.router import RouterCore
    from tests.fakes import LocalWorkerHandle, local_worker

    core = RouterCore({}, {"w": LocalWorkerHandle(local_worker("w", tiny_llama_dir))}, PolicyConfig(seed=0), 16)
    limits = FileStoreConfig(max_file_bytes=2000, max_bytes_per_tenant=5000, max_per_tenant=10)
    config = ApiConfig(api_keys={ALICE: "alice", BOB: "bob"}, files=limits)
    return build_app(ModelTable.single("m", core, Tokenizer.from_dir(smollm_dir), 512), config)


def _client(app, key):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0, http_client=TestClient(app))


def test_the_official_client_uploads_lists_reads_and_deletes_a_tenant_s_files(app):
    alice, bob = _client(app, ALICE), _client(app, BOB)
    image = png(5, size=(16, 16))
    up = alice.files.create(file=("cat.png", image, "image/png"), purpose="vision",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert (up.object, up.bytes, up.filename, up.purpose, up.status) == ("file", len(image), "cat.png", "vision",
                                                                         "processed")
    assert up.expires_at - up.created_at == 3600 and up.id.startswith("file-")
    notes = alice.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    assert notes.expires_at - notes.created_at == 86400  # the server's ttl
    assert [f.id for f in alice.files.list()] == [notes.id, up.id]  # newest first
    assert [f.id for f in alice.files.list(purpose="vision")] == [up.id]
    first = alice.files.list(order="asc", limit=1)
    assert [f.id for f in first.data] == [up.id] and first.has_more
    assert [f.id for f in first] == [up.id, notes.id]  # the client pages on by `after`
    assert alice.files.retrieve(up.id).filename == "cat.png"
    assert alice.files.content(up.id).content == image
    assert list(bob.files.list()) == []
    for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError) as err:  # another tenant's file: as if it never existed
            call(up.id)
        assert err.value.body["code"] == "file_not_found"
    assert alice.files.delete(up.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(up.id)
    alice.files.delete(notes.id)


@pytest.mark.parametrize("change, status, names", [
    ({"files": {"file": ("big.png", b"x" * 2001)}}, 413, "2000 bytes"),
    ({"files": {"file": ("big.png", b"x" * 80_000)}}, 413, "2000 bytes"),  # refused from its Content-Length
    ({"data": {"purpose": "fine-tune"}}, 400, "purpose"),
    ({"data": {"purpose": None}}, 400, "purpose"),
    ({"files": {"other": ("a.png", b"x")}}, 400, "no file part"),
    ({"data": {"purpose": "vision", "expires_after[anchor]": "created_at", "expires_after[seconds]": "60"}}, 400,
     "expires_after"),
    ({"data": {"purpose": "vision", "expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}},
     400, "anchor"),
    ({"json": {"file": "x", "purpose": "vision"}}, 400, "multipart"),
])
def test_bad_uploads_are_openai_4xx_and_keep_nothing(app, change, status, names):
    http = TestClient(app)
    request = {"files": {"file": ("a.png", png(1, size=(16, 16)))}, "data": {"purpose": "vision"}}
    request.update(change)
    request["data"] = {k: v for k, v in request.get("data", {}).items() if v is not None}
    if "json" in change:
        request = {"json": change["json"]}
    reply = http.post("/v1/files", headers={"Authorization": f"Bearer {ALICE}"}, **request)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and names in error["message"], error
    assert list(_client(app, ALICE).files.list()) == []


def test_a_tenant_s_storage_fills_and_an_unknown_key_reaches_no_file(app):
    alice = _client(app, ALICE)
    kept = [alice.files.create(file=(f"{i}.png", b"x" * 2000), purpose="vision").id for i in range(2)]
    with pytest.raises(openai.APIStatusError) as err:  # 4000 + 2000 bytes is over the tenant's 5000
        alice.files.create(file=("2.png", b"x" * 2000), purpose="vision")
    assert err.value.status_code == 413 and err.value.body["code"] == "file_storage_full"
    with pytest.raises(openai.AuthenticationError):
        _client(app, "sk-wrong-0123456789").files.retrieve(kept[0])
    for file_id in kept:
        alice.files.delete(file_id)


def test_an_upload_is_refused_from_its_content_length_before_its_body_is_read(app):
    """A client declaring a gigabyte is answered at once: nothing is read or spooled to find out."""
    body = TestClient(app).build_request("POST", "/v1/files", files={"file": ("a.png", b"x")},
                                         data={"purpose": "vision"})
    for declared, status in ((str(10**9), 413), (None, 400)):
        headers = {k: v for k, v in body.headers.items() if k.lower() != "content-length"}
        if declared is not None:
            headers["content-length"] = declared
        headers["authorization"] = f"Bearer {ALICE}"
        content = body.read()
        sent = content if declared is not None else iter([content])  # an iterator goes chunked: no length
        reply = TestClient(app).post("/v1/files", content=sent, headers=headers)
        assert reply.status_code == status, reply.text


class FakeActor:
    """A plain SharedStores behind `.method.remote(...)`, as a Ray actor handle offers its methods (awaitable)."""

    def __init__(self, stores):
        self.stores = stores
        self.moved = 0  # bytes of file data that crossed to the caller

    def __getattr__(self, name):
        method = getattr(self.stores, name)

        async def call(*args):
            answer = method(*args)
            if name == "get_file" and answer is not None:
                self.moved += len(StoredFile.from_wire(answer).data)
            return answer

        return SimpleNamespace(remote=call)


def test_replicas_share_files_and_responses_through_one_store_and_move_bytes_only_to_read_them():
    import dataclasses

    from disagg.cluster.shared_stores import RayFiles, RayResponses, SharedStores
    from disagg.http.response_store import ResponseStoreConfig, StoredResponse

    responses = ResponseStoreConfig(max_bytes_per_tenant=250)
    limits = FileStoreConfig(max_file_bytes=100, max_bytes_total=150)
    actor = FakeActor(SharedStores(dataclasses.asdict(responses), dataclasses.asdict(limits)))
    one, other = RayFiles(actor), RayFiles(actor)  # two replicas' ports

    async def scenario():
        kept = await one.put("a", StoredFile.new("a.png", FilePurpose.VISION, b"x" * 100), 3600.0)
        assert kept.data == b"" and kept.size == 100 and kept.expires_at - kept.created_at == 3600
        with pytest.raises(PayloadTooLarge) as err:  # another tenant, but over the store's total
            await other.put("b", StoredFile.new("b.png", FilePurpose.VISION, b"y" * 60), None)
        assert (err.value.code, err.value.param) == ("file_storage_full", "file") and "150 bytes" in err.value.message
        listed = await other.listed("a", None)
        info = await other.info("a", kept.file_id)
        assert [f.file_id for f in listed] == [kept.file_id] and listed[0].data == info.data == b""
        assert actor.moved == 0  # an upload, a listing and a retrieve moved no image data
        assert (await other.get("a", kept.file_id)).data == b"x" * 100 and actor.moved == 100
        with pytest.raises(NotFound):
            await other.get("b", kept.file_id, "input[0]")
        await other.delete("a", kept.file_id)
        with pytest.raises(NotFound):
            await one.info("a", kept.file_id)
        stores = RayResponses(actor)
        for i in range(3):  # 103 bytes each: the third pushes the first out of the 250-byte bound
            await stores.put("a", StoredResponse.of(f"resp_{i}", f"resp_{i}", [{"role": "user", "content": "x"}],
                                                    {"id": f"resp_{i}", "pad": "p" * 40}))
        with pytest.raises(NotFound):
            await stores.get("a", "resp_0")
        assert (await stores.get("a", "resp_2")).body()["id"] == "resp_2"

    asyncio.run(scenario())


def test_requests_are_counted_by_route_template_never_by_the_id_in_the_path(app):
    from prometheus_client import generate_latest

    alice = _client(app, ALICE)
    up = alice.files.create(file=("a.png", b"x"), purpose="vision")
    alice.files.retrieve(up.id)
    alice.files.delete(up.id)
    http = TestClient(app)
    http.get("/v1/made-up/12345", headers={"Authorization": f"Bearer {ALICE}"})
    http.get("/v1/files/file-nope")  # no key: a 401, counted by the route too
    text = generate_latest(app.state.metrics.registry).decode()
    assert up.id not in text and "12345" not in text and "file-nope" not in text
    assert 'disagg:requests_total{endpoint="/v1/files/{file_id}",status="200"}' in text
    assert 'disagg:requests_total{endpoint="/v1/files/{file_id}",status="401"}' in text
    assert 'disagg:requests_total{endpoint="unmatched",status="404"}' in text


@pytest.fixture(scope="module")
def url(app):
    """The app on a real server: the `anthropic` client speaks over its own HTTP library, not Starlette's."""
    from disagg.http.server import HttpServer

    server = HttpServer(app, "127.0.0.1", 0)
    yield server.start()
    server.stop()


def _claude(url, key):
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=30)


def test_the_official_anthropic_client_gets_the_same_files_in_anthropic_s_shapes(app, url):
    alice, bob = _claude(url, ALICE), _claude(url, BOB)
    image = png(6, size=(16, 16))
    up = alice.beta.files.upload(file=("cat.png", image, "image/png"))
    assert (up.type, up.filename, up.mime_type, up.size_bytes, up.downloadable) == (
        "file", "cat.png", "image/png", len(image), True)
    assert up.expires_at - up.created_at == datetime.timedelta(days=1)  # the server's ttl
    notes = alice.beta.files.upload(file=("notes.txt", b"hello", "text/plain"), expires_in_seconds=3600)
    assert notes.mime_type == "text/plain" and notes.expires_at - notes.created_at == datetime.timedelta(hours=1)
    assert [f.id for f in alice.beta.files.list()] == [notes.id, up.id]  # newest first
    first = alice.beta.files.list(limit=1)
    assert [f.id for f in first.data] == [notes.id] and first.next_page
    assert [f.id for f in first] == [notes.id, up.id]  # the client pages on by its cursor
    extra = alice.beta.files.upload(file=("x.png", image, "image/png"))
    pages = alice.beta.files.list(limit=1)
    alice.beta.files.delete(extra.id)  # the file its cursor was taken after is gone: the cursor still holds
    assert [f.id for f in pages] == [extra.id, notes.id, up.id]
    assert [f.id for f in alice.beta.files.list(ids=[up.id, "file-gone"])] == [up.id]  # unknown ids left out
    assert list(alice.beta.files.list(scope_id="session_1")) == []  # an upload is of no session's scope
    for bad in (dict(ids=[up.id], limit=5), dict(page="bogus"), dict(limit=1001)):
        with pytest.raises(anthropic.BadRequestError):
            alice.beta.files.list(**bad)
    assert alice.beta.files.retrieve_metadata(up.id).filename == "cat.png"
    assert alice.beta.files.download(up.id).read() == image
    assert _client(app, ALICE).files.retrieve(up.id).purpose == "user_data"  # one store, two APIs' shapes
    assert list(bob.beta.files.list()) == []
    for call in (bob.beta.files.retrieve_metadata, bob.beta.files.download, bob.beta.files.delete):
        with pytest.raises(anthropic.NotFoundError) as err:  # another tenant's file: as if it never existed
            call(up.id)
        assert err.value.body["error"]["type"] == "not_found_error"  # Anthropic's error shape
    with pytest.raises(anthropic.BadRequestError) as err:
        alice.beta.files.upload(file=("a.png", image, "image/png"), expires_in_seconds=60)
    assert "expires_in_seconds" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as err:
        _claude(url, "sk-wrong-0123456789").beta.files.list()
    assert err.value.body["type"] == "error"
    assert alice.beta.files.delete(up.id).type == "file_deleted"
    with pytest.raises(anthropic.NotFoundError):
        alice.beta.files.retrieve_metadata(up.id)
    alice.beta.files.delete(notes.id)
