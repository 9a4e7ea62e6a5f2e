"""The front door's side of images: a request's `image_url` parts loaded within the server's limits (a data URL; a
remote URL only when the operator allows fetching, with a size and a time limit), and the image
token the chat template writes in their place (the prompt's expansion: disagg/vision/prompt.py)."""

from __future__ import annotations

import asyncio

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


async def prompt_images(
    served: ServedModel, urls: list[str], limits: ImageLimits, param: str
) -> tuple[str, list[LoadedImage]]:
    """The image token a conversation's image parts become in its template, and their images, loaded."""
    return image_token(served), await load_images(urls, served, limits, param)


def place_images(
    served: ServedModel, ids: list[int], images: list[LoadedImage], param: str
) -> tuple[list[int], list[ImageInput]]:
    """The templated prompt with each image token expanded into its image's placeholder ids (vision/prompt.py)."""
    if served.vision is None:
        return ids, []
    return expand_images(ids, served.vision, images, param)


async def load_images(urls: list[str], served: ServedModel, limits: ImageLimits, param: str) -> list[LoadedImage]:
    if not urls:
        return []
    if served.vision is None:
        raise InvalidRequest(f"model {served.name!r} takes no images", param=param, code="images_not_supported")
    if len(urls) > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(urls)} images: over this server's limit of {limits.max_images_per_request} per request",
            param=param,
            code="too_many_images",
        )
    return [await load_image(url, limits, param) for url in urls]


async def fetch_image(url: str, limits: ImageLimits, param: str) -> bytes:
    """A remote image, streamed with a byte limit and one deadline for the whole fetch (a server trickling bytes
    does not hold the request); every failure is the client's 400."""
    body = bytearray()

    async def fetch() -> None:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"fetching the image gave HTTP {response.status_code}", param=param)
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > limits.max_image_bytes:
                        raise too_large(limits, param)

    try:
        await asyncio.wait_for(fetch(), limits.fetch_timeout_s)
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        raise InvalidRequest(f"the image could not be fetched: {type(exc).__name__}", param=param) from None
    return bytes(body)


async def load_image(url: str, limits: ImageLimits, param: str) -> LoadedImage:
    """An `image_url`'s image: a data URL always; http(s) only when fetching is on (a 400 saying so otherwise)."""
    if url.startswith("data:"):
        return check_image(decode_data_url(url, limits, param), limits, param)
    if url.startswith(("http://", "https://")):
        if not limits.fetch_remote_images:
            raise InvalidRequest(
                "remote image URLs are not fetched by this server (--fetch-remote-images is off): send the image "
                "as a data URL",
                param=param,
                code="remote_image_refused",
            )
        return check_image(await fetch_image(url, limits, param), limits, param)
    raise InvalidRequest("an image URL must be a data: URL or, where fetching is on, http(s)", param=param)
