"""A prompt's images put in place: each image token the chat template wrote becomes the image's placeholder ids
(disagg/vision/images.py), one per position its embedding fills, and the request carries the image itself."""

from __future__ import annotations

from disagg.errors import InvalidRequest
from disagg.protocol import ImageInput
from disagg.vision.images import LoadedImage, placeholder_ids
from disagg.vision.spec import VisionSpec


def expand_images(
    ids: list[int], spec: VisionSpec, images: list[LoadedImage], param: str
) -> tuple[list[int], list[ImageInput]]:
    """`ids` with the k-th image token replaced by the k-th image's placeholder ids, and the images' spans.  The
    image token typed into a message's text (not an image part) would stand for no image: a 400."""
    positions = [i for i, t in enumerate(ids) if t == spec.image_token_id]
    if len(positions) != len(images):
        raise InvalidRequest(
            f"the prompt holds {len(positions)} image tokens for {len(images)} images: the model's image token "
            "may not appear in text",
            param=param,
        )
    out: list[int] = []
    inputs: list[ImageInput] = []
    last = 0
    n = spec.tokens_per_image
    for pos, image in zip(positions, images):
        out.extend(ids[last:pos])
        inputs.append(ImageInput(image.content_hash, len(out), n, data=image.data))
        out.extend(placeholder_ids(image.content_hash, n, spec.vocab_size))
        last = pos + 1
    out.extend(ids[last:])
    return out, inputs
