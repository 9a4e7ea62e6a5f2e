"""Images named by an uploaded file (http/file_images.py), each check made before any file's bytes are read: a
Responses `input_image` by `file_id` becomes the upload's data URL (`inline_files`), a Messages image block's file
source its base64 source (`inline_message_files`), a chat `file` part an `image_url` part (`inline_chat_files`).
The same image by file and inline giving the same tokens on a real VLM cluster is tests/test_vision_cluster.py's."""
import asyncio
import base64

import pytest

from disagg.errors import InvalidRequest, NotFound, PayloadTooLarge
from disagg.http.file_images import inline_chat_files, inline_files, inline_message_files
from disagg.http.file_store import FilePurpose, FileStore, StoredFile
from disagg.http.messages_schema import MessagesRequest
from disagg.http.responses_schema import ResponsesRequest
from disagg.http.schemas import ChatCompletionRequest
from disagg.vision.images import ImageLimits
from tests.files_fakes import TEXT_ONLY, VLM, Clock, CountingFiles
from tests.imagegen import data_url, png


def _uploads(image):
    """Tenant "a"'s store, counting its reads, holding `image` and a text file; the two uploads' answers."""
    files = CountingFiles(FileStore(clock=Clock()))
    stored = asyncio.run(files.put("a", StoredFile.new("cat.png", FilePurpose.VISION, image), None))
    text = asyncio.run(files.put("a", StoredFile.new("notes.txt", FilePurpose.USER_DATA, b"hello"), None))
    return files, image, stored, text


def _body(*parts):
    return ResponsesRequest.model_validate(
        {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}, *parts]}]})


def test_an_input_image_by_file_id_becomes_the_upload_s_data_url():
    files, image, stored, text = _uploads(png(3))
    assert stored.data == b"" and stored.size == len(image)  # an upload's answer carries no bytes back
    by_file = {"type": "input_image", "file_id": stored.file_id}

    def inline(body, tenant="a", served=VLM, limits=ImageLimits(), earlier=0):
        return asyncio.run(inline_files(body.items(), files, tenant, served, limits, earlier=earlier))

    [item] = inline(_body(by_file, by_file))
    assert item.image_urls() == [data_url(image)] * 2 and files.reads == 1  # named twice, read once
    assert item.content[1].file_id == stored.file_id
    [listed] = _body(by_file).items()[0].listed()["content"][1:]  # input items list the part as sent
    assert (listed["file_id"], listed["image_url"]) == (stored.file_id, None)
    with pytest.raises(NotFound) as err:
        inline(_body(by_file), tenant="b")
    assert err.value.param == "input[0].content[1].file_id"
    with pytest.raises(InvalidRequest) as err:
        inline(_body({"type": "input_image", "file_id": text.file_id}))
    assert err.value.code == "invalid_image"
    files.reads = 0
    refusals = [
        (dict(served=TEXT_ONLY), "images_not_supported"),
        (dict(limits=ImageLimits(max_image_bytes=len(image) - 1)), "image_too_large"),  # refused from its size
        (dict(limits=ImageLimits(max_images_per_request=1)), "too_many_images"),
        (dict(earlier=7), "too_many_images"),  # 7 in the stored conversation + these 2: over the default 8
    ]
    for change, code in refusals:
        with pytest.raises((InvalidRequest, PayloadTooLarge)) as err:
            inline(_body(by_file, {"type": "input_image", "image_url": data_url(image)}), **change)
        assert err.value.code == code
    assert files.reads == 0  # no refused request read a file's bytes
    for both in ({"image_url": data_url(image), "file_id": stored.file_id}, {}):
        with pytest.raises(ValueError, match="exactly one"):
            _body({"type": "input_image", **both})


def _message(*blocks):
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, *blocks]}]})


def test_a_messages_image_block_by_file_becomes_the_upload_s_base64_source():
    files, image, stored, text = _uploads(png(4))
    by_file = {"type": "image", "source": {"type": "file", "file_id": stored.file_id}}
    inline_block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                "data": base64.b64encode(image).decode()}}

    def inline(body, tenant="a", served=VLM, limits=ImageLimits()):
        return asyncio.run(inline_message_files(body, files, tenant, served, limits))

    body = inline(_message(by_file, by_file))
    assert body.image_urls() == [data_url(image)] * 2 and files.reads == 1  # named twice, read once
    assert body == _message(inline_block, inline_block)  # the request it would be with the image inline
    with pytest.raises(RuntimeError, match="not read"):  # a file source never read is a bug, said loudly
        _message(by_file).image_urls()
    with pytest.raises(NotFound) as err:
        inline(_message(by_file), tenant="b")
    assert (err.value.code, err.value.param) == ("file_not_found", "messages[0].content[1].source.file_id")
    with pytest.raises(InvalidRequest) as err:
        inline(_message({"type": "image", "source": {"type": "file", "file_id": text.file_id}}))
    assert err.value.code == "invalid_image"
    files.reads = 0
    refusals = [
        (dict(served=TEXT_ONLY), "images_not_supported"),
        (dict(limits=ImageLimits(max_image_bytes=len(image) - 1)), "image_too_large"),  # refused from its size
        (dict(limits=ImageLimits(max_images_per_request=1)), "too_many_images"),  # the inline one counts too
    ]
    for change, code in refusals:
        with pytest.raises((InvalidRequest, PayloadTooLarge)) as err:
            inline(_message(by_file, inline_block), **change)
        assert err.value.code == code
    assert files.reads == 0  # no refused request read a file's bytes
    with pytest.raises(ValueError):
        _message({"type": "image", "source": {"type": "file", "file_id": ""}})


def _chat(*parts):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]})


def test_a_chat_file_part_becomes_an_image_part_by_file_id_or_its_own_data():
    files, image, stored, text = _uploads(png(7))
    inline_part = {"type": "image_url", "image_url": {"url": data_url(image)}}
    encoded = base64.b64encode(image).decode()

    def inline(body, tenant="a", served=VLM, limits=ImageLimits()):
        return asyncio.run(inline_chat_files(body, files, tenant, served, limits))

    for ref in ({"file_id": stored.file_id}, {"file_data": data_url(image), "filename": "cat.png"},
                {"file_data": encoded}):  # by upload, as a data URL, as bare base64: the inline image's request
        assert inline(_chat({"type": "file", "file": ref})) == _chat(inline_part)
    with pytest.raises(RuntimeError, match="not read"):  # a file part never read is a bug, said loudly
        _chat({"type": "file", "file": {"file_id": stored.file_id}}).messages[0].image_urls()
    bad = [
        ({"file_id": stored.file_id}, dict(tenant="b"), NotFound, "file_not_found", "file.file_id"),
        ({"file_id": text.file_id}, {}, InvalidRequest, "invalid_image", "file.file_id"),
        ({"file_data": base64.b64encode(b"%PDF-1.7").decode()}, {}, InvalidRequest, "invalid_image", "file.file_data"),
        ({"file_data": "data:application/pdf;base64,JVBERg=="}, {}, InvalidRequest, None, "file.file_data"),
        ({"file_data": "not base64!"}, {}, InvalidRequest, None, "file.file_data"),
        ({"file_data": encoded}, dict(limits=ImageLimits(max_image_bytes=len(image) - 8)), PayloadTooLarge,
         "image_too_large", "file.file_data"),
        ({"file_id": stored.file_id}, dict(served=TEXT_ONLY), InvalidRequest, "images_not_supported", None),
    ]
    for ref, change, error, code, param in bad:
        with pytest.raises(error) as err:
            inline(_chat({"type": "file", "file": ref}), **change)
        assert err.value.code == code or code is None
        assert err.value.param == (f"messages[0].content[1].{param}" if param else "messages")
    with pytest.raises(InvalidRequest, match="file parts carry images here"):  # clients send PDFs this way too
        inline(_chat({"type": "file", "file": {"file_data": encoded}}), served=TEXT_ONLY)
    files.reads = 0
    with pytest.raises(PayloadTooLarge):  # counted with the request's other images before any file is read
        inline(_chat({"type": "file", "file": {"file_id": stored.file_id}}, inline_part),
               limits=ImageLimits(max_images_per_request=1))
    assert files.reads == 0
    for ref in ({}, {"file_id": stored.file_id, "file_data": encoded}):
        with pytest.raises(ValueError, match="exactly one"):
            _chat({"type": "file", "file": ref})
