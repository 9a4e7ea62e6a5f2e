"""Images in requests: an `image_url` read (a data URL; a remote URL only when the operator allows fetching, with a
size and a time limit), checked within limits, hashed by content, and the placeholder token ids that stand for its
embedding in the prompt.  Pure: no torch; the front door (router process) uses it.

Why placeholder ids above the vocabulary: an image becomes `n` prompt positions (the model's image_seq_length).  Were
they the model's image token repeated, every image would hash alike and one image's cached KV would answer for
another.  Each position instead gets an id >= vocab_size derived from the image's content hash and its index (SGLang
pads image tokens with the image's hash the same way), so the block hashes of the router, the workers and the
simulator fold the image in with no change: a repeated image is a prefix hit, another image is not, and the engine
knows which positions take an embedding row.  31-bit ids (block hashes pack token ids as int32); a block of 16 image
positions carries 16 independent ids, so two images share a block hash only if all of them collide.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass, field

from disagg.errors import InvalidRequest, PayloadTooLarge

INT32_LIMIT = 2**31 - 1  # placeholder ids stay below: block hashes pack token ids as int32
_DATA_URL = re.compile(r"data:(?P<mime>image/[A-Za-z0-9.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)", re.S)


@dataclass
class ImageLimits:
    """What the front door accepts as an image (the API's `image_url` content parts)."""

    max_image_bytes: int = field(
        default=8 * 2**20, metadata={"help": "an image's encoded size at most (bytes); more gets a 413"}
    )
    max_image_pixels: int = field(
        default=4096 * 4096, metadata={"help": "an image's width x height at most; more gets a 413"}
    )
    max_images_per_request: int = field(default=8, metadata={"help": "images in one request at most; more: 413"})
    fetch_remote_images: bool = field(
        default=False,
        metadata={"help": "fetch http(s) image URLs (size and time limited); off: data URLs only (a remote one: 400)"},
    )
    fetch_timeout_s: float = field(default=5.0, metadata={"help": "a remote image's whole fetch at most (seconds)"})


@dataclass(frozen=True)
class LoadedImage:
    """An image's bytes as sent (PNG, JPEG, ...), checked, and its content hash (hex)."""

    data: bytes
    content_hash: str
    width: int
    height: int


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def placeholder_ids(image_hash: str, num_tokens: int, vocab_size: int) -> list[int]:
    """The prompt ids of an image's `num_tokens` positions: each >= vocab_size, from the hash and its index."""
    span = INT32_LIMIT - vocab_size
    seed = bytes.fromhex(image_hash)
    out = []
    for i in range(num_tokens):
        digest = hashlib.blake2b(seed + i.to_bytes(4, "little"), digest_size=8).digest()
        out.append(vocab_size + int.from_bytes(digest, "little") % span)
    return out


def decode_data_url(url: str, limits: ImageLimits, param: str) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise InvalidRequest("an image data URL must be data:image/<type>;base64,<data>", param=param)
    encoded = match["data"]
    if len(encoded) * 3 // 4 > limits.max_image_bytes:  # before decoding: a huge payload is not materialised
        raise _too_large(limits, param)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image data URL's base64 does not decode", param=param) from None


def _too_large(limits: ImageLimits, param: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the image is over this server's limit of {limits.max_image_bytes} bytes", param=param, code="image_too_large"
    )


async def fetch_image(url: str, limits: ImageLimits, param: str) -> bytes:
    """A remote image, streamed with a byte limit and a deadline; every failure is the client's 400."""
    import httpx

    body = bytearray()
    try:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"fetching the image gave HTTP {response.status_code}", param=param)
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limits.max_image_bytes:
                        raise _too_large(limits, param)
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"the image could not be fetched: {type(exc).__name__}", param=param) from None
    return bytes(body)


def check_image(data: bytes, limits: ImageLimits, param: str) -> LoadedImage:
    """Decodable, within the byte and pixel limits (read from the header before any pixel is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise _too_large(limits, param)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height}: over this server's limit of {limits.max_image_pixels} pixels",
                    param=param,
                    code="image_too_large",
                )
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, PayloadTooLarge):
            raise
        raise InvalidRequest("the image could not be decoded", param=param, code="invalid_image") from None
    return LoadedImage(data, content_hash(data), width, height)


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
