"""The front door's side of images: a request's `image_url` parts loaded within the server's limits, and the image
token the chat template writes in their place (the prompt's expansion: disagg/vision/prompt.py)."""

from __future__ import annotations

from disagg.errors import InvalidRequest, PayloadTooLarge
from disagg.http.models import ServedModel
from disagg.vision.images import ImageLimits, LoadedImage, load_image


def image_token(served: ServedModel) -> str:
    """The text a message's image part becomes in the template ("" for a text-only model: it gets no images)."""
    if served.vision is None:
        return ""
    return served.tokenizer.token_text(served.vision.image_token_id) or ""


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
