"""The front door's side of images: a request's `image_url` parts loaded within the server's limits (a data URL; a
remote URL only when the operator allows fetching, with a size and a time limit), and the image
token the chat template writes in their place (the prompt's expansion: disagg/vision/prompt.py)."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx

from disagg.errors import InvalidRequest, PayloadTooLarge
from disagg.http.models import ServedModel
from disagg.protocol import ImageInput
from disagg.vision.images import ImageLimits, LoadedImage, check_image, decode_data_url, too_large
from disagg.vision.prompt import expand_images


def image_token(served: ServedModel) -> str:
    """The text a message's image part becomes in the template ("" for a text-only model: it gets no images)."""
    if served.vision is None:
        return ""
    return served.tokenizer.token_text(served.vision.image_token_id) or ""


def place_images(
    served: ServedModel, ids: list[int], images: list[LoadedImage], param: str
) -> tuple[list[int], list[ImageInput]]:
    """The templated prompt with each image token expanded into its image's placeholder ids (vision/prompt.py)."""
    if served.vision is None:
        return ids, []
    return expand_images(ids, served.vision, images, param)


def check_image_count(count: int, served: ServedModel, limits: ImageLimits, param: str) -> None:
    """A request's images are for a model that takes images, and no more than the server's limit (checked before
    any is read, decoded or fetched)."""
    if count and served.vision is None:
        raise InvalidRequest(f"model {served.name!r} takes no images", param=param, code="images_not_supported")
    if count > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"{count} images: over this server's limit of {limits.max_images_per_request} per request",
            param=param,
            code="too_many_images",
        )


async def load_images(urls: list[str], served: ServedModel, limits: ImageLimits, param: str) -> list[LoadedImage]:
    check_image_count(len(urls), served, limits, param)
    return [await load_image(url, limits, param) for url in urls]


async def _check_host(url: str, limits: ImageLimits, param: str) -> None:
    """Unless the operator allows it, an image URL must not lead to loopback, private or link-local addresses: a
    client must not make the server fetch from its own network (169.254.169.254, an admin port).  The host is
    resolved here and again by the client (a name that re-resolves elsewhere in between is not caught)."""
    if limits.fetch_private_hosts:
        return
    host = httpx.URL(url).host
    infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    if not addresses or not all(a.is_global for a in addresses):
        raise InvalidRequest(
            "the image URL's host is not a public address (--fetch-private-hosts is off)",
            param=param,
            code="image_url_not_public",
        )


async def fetch_image(url: str, limits: ImageLimits, param: str) -> bytes:
    """A remote image, streamed raw (no decompression before the size check) with a byte limit and one deadline
    for the whole fetch (a server trickling bytes does not hold the request); every failure is the client's 400."""
    body = bytearray()

    async def fetch() -> None:
        await _check_host(url, limits, param)
        headers = {"Accept-Encoding": "identity"}
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"fetching the image gave HTTP {response.status_code}", param=param)
                async for chunk in response.aiter_raw():
                    body.extend(chunk)
                    if len(body) > limits.max_image_bytes:
                        raise too_large(limits, param)

    try:
        await asyncio.wait_for(fetch(), limits.fetch_timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL, OSError, asyncio.TimeoutError) as exc:
        raise InvalidRequest(f"the image could not be fetched: {type(exc).__name__}", param=param) from None
    return bytes(body)


async def load_image(url: str, limits: ImageLimits, param: str) -> LoadedImage:
    """An `image_url`'s image: a data URL always; http(s) only when fetching is on (a 400 saying so otherwise).
    Decoding and checking run in a thread: megabytes of base64 and pixels must not stall the event loop."""
    if url.startswith("data:"):
        return await asyncio.to_thread(lambda: check_image(decode_data_url(url, limits, param), limits, param))
    if url.startswith(("http://", "https://")):
        if not limits.fetch_remote_images:
            raise InvalidRequest(
                "remote image URLs are not fetched by this server (--fetch-remote-images is off): send the image "
                "as a data URL",
                param=param,
                code="remote_image_refused",
            )
        data = await fetch_image(url, limits, param)
        return await asyncio.to_thread(check_image, data, limits, param)
    raise InvalidRequest("an image URL must be a data: URL or, where fetching is on, http(s)", param=param)
