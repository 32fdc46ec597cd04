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
MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "bmp": "image/bmp"}
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
    if not decode:
        size = _header_size(data, image_format)
        if size is not None:
            _check_size(image_format, *size, max_pixels=max_pixels)
            return ImageInfo(image_format, EXTENSIONS[image_format], *size)
    try:
        with Image.open(io.BytesIO(data), formats=[image_format.upper()]) as image:
            _check_size(image_format, *image.size, max_pixels=max_pixels)
            width, height = image.size
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


def _check_size(image_format: str, width: int, height: int, *, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InvalidInput(f"the {image_format} image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}; send a smaller image"
        )


_JPEG_FRAME_MARKERS = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}
)
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})


def _header_size(data: bytes, image_format: str) -> tuple[int, int] | None:
    """(width, height) read straight from a PNG or JPEG header, or None to let Pillow find out.

    Pillow's JPEG parser reads every table in Python; the prediction hot path only needs the frame size.
    """
    if image_format == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    if image_format != "jpeg":
        return None
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        if marker in _JPEG_FRAME_MARKERS:
            if position + 9 > len(data):
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return (width, height) if width and height else None  # height 0: given later (DNL)
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None
