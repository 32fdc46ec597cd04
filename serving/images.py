"""Validation of uploaded images before they reach the model: sniffed format, pixel limit, full decode.

The content type a client sends is ignored; the format comes from the file's first bytes. The pixel count
is checked from the header before any pixel is decoded, so a decompression bomb is refused cheaply
(:func:`check_image_header`, all the prediction hot path needs, since the model decodes the image itself).
A full decode with Pillow (:func:`validate_image`) also catches truncated and corrupt files; images that
are kept (feedback, ``/classify``) and batches the model refused go through it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from serving.errors import InvalidInput, PayloadTooLarge

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
EXTENSIONS = {"jpeg": "jpg", "png": "png", "gif": "gif", "bmp": "bmp"}
SUPPORTED = "JPEG, PNG, GIF or BMP"


@dataclass(frozen=True)
class ImageInfo:
    """What validation learned about an accepted image."""

    format: str
    extension: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, or None when it is none tfloop accepts."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def validate_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Check that ``data`` is a whole JPEG/PNG/GIF/BMP image of at most ``max_pixels`` pixels.

    Raises :class:`InvalidInput` (400) for empty, unknown, truncated or corrupt data and
    :class:`PayloadTooLarge` (413) for images over the pixel limit.
    """
    return _inspect(data, max_pixels=max_pixels, decode=True)


def check_image_header(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Like :func:`validate_image`, from the header alone: format, size and pixel limit, no pixel decoded.

    Several times cheaper than a full decode (which grows with the image), so it suits data the model
    decodes anyway; a truncated body passes it and fails in the model instead.
    """
    return _inspect(data, max_pixels=max_pixels, decode=False)


def _inspect(data: bytes, *, max_pixels: int, decode: bool) -> ImageInfo:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidInput(f"the image is empty: send the bytes of a {SUPPORTED} file")
    image_format = sniff_format(data)
    if image_format is None:
        raise InvalidInput(f"the upload is not a supported image (its content is not {SUPPORTED})")
    try:
        with Image.open(io.BytesIO(data), formats=[image_format.upper()]) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidInput(f"the {image_format} image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels}; send a smaller image"
                )
            if decode:
                image.load()
    except (InvalidInput, PayloadTooLarge):
        raise
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(f"the image is too large to decode safely: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidInput(
            f"the {image_format} image cannot be decoded ({error}); it may be truncated or corrupt"
        ) from error
    return ImageInfo(image_format, EXTENSIONS[image_format], width, height)
