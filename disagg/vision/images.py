"""Images in requests: a data URL decoded, an image checked within limits, hashed by content, and the placeholder
token ids that stand for its embedding in the prompt.  Pure: no torch, no network (fetching a remote URL is the
front door's: http/images.py).

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
import struct
from dataclasses import dataclass, field

from disagg.errors import InvalidRequest, PayloadTooLarge

IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")  # what PIL may parse from a client
# what PIL raises for bytes that are not a decodable image of those formats (its plugins raise several types)
_UNDECODABLE = (OSError, ValueError, SyntaxError, EOFError, IndexError, NotImplementedError, struct.error)
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
    fetch_private_hosts: bool = field(
        default=False,
        metadata={"help": "fetch images from loopback, private and link-local addresses too (an intranet's server)"},
    )


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
        raise too_large(limits, param)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image data URL's base64 does not decode", param=param) from None


def too_large(limits: ImageLimits, param: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the image is over this server's limit of {limits.max_image_bytes} bytes", param=param, code="image_too_large"
    )


def check_image(data: bytes, limits: ImageLimits, param: str) -> LoadedImage:
    """An image of an allowed format (PNG, JPEG, GIF, WebP: no other PIL plugin ever parses client bytes), within
    the byte and pixel limits (the pixels read from the header first), and decoded in full once (a truncated or
    corrupt file is the client's 400 here, not a worker's failure later).  CPU work: callers on an event loop run
    it in a thread."""
    from PIL import Image

    if len(data) > limits.max_image_bytes:
        raise too_large(limits, param)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height <= limits.max_image_pixels:
                image.convert("RGB")  # every pixel decoded, as the encoder will
    except Image.DecompressionBombError:  # a header claiming far more pixels than PIL opens
        raise PayloadTooLarge(
            f"the image is over this server's limit of {limits.max_image_pixels} pixels",
            param=param,
            code="image_too_large",
        ) from None
    except _UNDECODABLE:
        raise InvalidRequest(
            f"the image could not be decoded (accepted: {', '.join(IMAGE_FORMATS)})", param=param, code="invalid_image"
        ) from None
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height}: over this server's limit of {limits.max_image_pixels} pixels",
            param=param,
            code="image_too_large",
        )
    return LoadedImage(data, content_hash(data), width, height)


def open_image(data: bytes):  # -> PIL.Image.Image (PIL is imported where images are used, not at start-up)
    """An image the front door checked, opened the same way (the encoder's side)."""
    from PIL import Image

    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
