"""A procedurally drawn image dataset for the offline demo and the tests.

Six visually distinct classes (filled circles, squares, triangles, crosses, stripes, checkerboards) drawn
with PIL in class-typical hues (jittered), random brightness, sizes, positions and angles, on noisy
backgrounds, saved as JPEGs in the ``<label>/<file>`` layout that :mod:`training.data` reads. The output
depends only on the seed.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import storage

DEMO_CLASSES: tuple[str, ...] = ("checkerboard", "circle", "cross", "square", "stripes", "triangle")
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class DemoDatasetSummary:
    """What :func:`make_demo_dataset` wrote."""

    root: str
    labels: tuple[str, ...]
    per_class: int
    image_size: int
    files: int


Color = tuple[int, int, int]
Painter = Callable[[ImageDraw.ImageDraw, random.Random, int, Color], None]


def _class_colors(label: str, rng: random.Random) -> tuple[Color, Color]:
    """A greyish background and a saturated foreground whose hue is typical of the class (with jitter).

    Shape and hue both carry the class, so a small network trained from scratch on a CPU learns the demo
    in minutes, while brightness, size, position, angle, blur and noise still vary freely.
    """
    base_hue = DEMO_CLASSES.index(label) / len(DEMO_CLASSES) if label in DEMO_CLASSES else rng.random()
    hue = (base_hue + rng.uniform(-0.04, 0.04)) % 1.0
    foreground = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    grey = rng.uniform(0.05, 0.45)
    background = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), grey)
    return _to_bytes(background), _to_bytes(foreground)


def _to_bytes(rgb: tuple[float, float, float]) -> Color:
    red, green, blue = (round(channel * 255) for channel in rgb)
    return red, green, blue


def _rotated(
    points: list[tuple[float, float]], center: tuple[float, float], angle: float
) -> list[tuple[float, float]]:
    cx, cy = center
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in points]


def _center_and_radius(rng: random.Random, size: int) -> tuple[float, float, float]:
    radius = rng.uniform(0.2, 0.38) * size
    margin = radius * 0.8
    return rng.uniform(margin, size - margin), rng.uniform(margin, size - margin), radius


def _circle(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, color: Color) -> None:
    cx, cy, r = _center_and_radius(rng, size)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)


def _square(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, color: Color) -> None:
    cx, cy, r = _center_and_radius(rng, size)
    corners = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    draw.polygon(_rotated(corners, (cx, cy), rng.uniform(-0.3, 0.3)), fill=color)


def _triangle(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, color: Color) -> None:
    cx, cy, r = _center_and_radius(rng, size)
    corners = [
        (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
    ]
    draw.polygon(_rotated(corners, (cx, cy), rng.uniform(-0.4, 0.4)), fill=color)


def _cross(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, color: Color) -> None:
    cx, cy, r = _center_and_radius(rng, size)
    w = r * rng.uniform(0.25, 0.4)
    angle = rng.uniform(-0.3, 0.3)
    for bar in (
        [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
        [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
    ):
        draw.polygon(_rotated(bar, (cx, cy), angle), fill=color)


def _stripes(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, color: Color) -> None:
    period = rng.uniform(0.12, 0.22) * size
    width = period * rng.uniform(0.35, 0.6)
    angle = rng.uniform(0, math.pi)
    center = (size / 2, size / 2)
    offset = rng.uniform(0, period)
    position = -size + offset
    while position < size:
        bar = [
            (position, -size),
            (position + width, -size),
            (position + width, 2 * size),
            (position, 2 * size),
        ]
        draw.polygon(_rotated(bar, center, angle), fill=color)
        position += period


def _checkerboard(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, color: Color) -> None:
    cell = rng.uniform(0.14, 0.25) * size
    angle = rng.uniform(-0.4, 0.4)
    center = (size / 2, size / 2)
    cells = int(2 * size / cell) + 2
    for row in range(-cells, cells):
        for col in range(-cells, cells):
            if (row + col) % 2 == 0:
                x, y = size / 2 + col * cell, size / 2 + row * cell
                square = [(x, y), (x + cell, y), (x + cell, y + cell), (x, y + cell)]
                draw.polygon(_rotated(square, center, angle), fill=color)


_PAINTERS: dict[str, Painter] = {
    "checkerboard": _checkerboard,
    "circle": _circle,
    "cross": _cross,
    "square": _square,
    "stripes": _stripes,
    "triangle": _triangle,
}


def draw_demo_image(label: str, *, seed: int, image_size: int) -> Image.Image:
    """One RGB image of class ``label``; the same (label, seed, size) always gives the same pixels."""
    rng = random.Random(f"{label}:{seed}")
    canvas = image_size * _SUPERSAMPLE
    background, foreground = _class_colors(label, rng)
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    _PAINTERS[label](draw, rng, canvas, foreground)
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.9)))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(
        0.0, rng.uniform(4, 14), (image_size, image_size, 3)
    )
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_demo_dataset(
    out: str,
    *,
    per_class: int = 150,
    seed: int = 0,
    image_size: int = 64,
    labels: tuple[str, ...] = DEMO_CLASSES,
) -> DemoDatasetSummary:
    """Write ``per_class`` JPEGs of each demo class to ``out/<label>/<label>-<n>.jpg`` (local or ``gs://``)."""
    unknown = sorted(set(labels) - set(_PAINTERS))
    if unknown:
        raise storage.TfloopError(f"unknown demo classes {unknown}; choose from {list(DEMO_CLASSES)}")
    if per_class < 1 or image_size < 16:
        raise storage.TfloopError("make-demo needs --per-class >= 1 and --image-size >= 16")

    def write_one(job: tuple[str, int]) -> None:
        label, index = job
        image_seed = seed * 1_000_003 + index
        quality = random.Random(f"q:{label}:{image_seed}").randint(70, 95)
        data = _encode_jpeg(draw_demo_image(label, seed=image_seed, image_size=image_size), quality)
        storage.write_bytes(storage.join(out, label, f"{label}-{index:04d}.jpg"), data)

    jobs = [(label, index) for label in labels for index in range(per_class)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write_one, jobs))
    return DemoDatasetSummary(
        root=out, labels=tuple(sorted(labels)), per_class=per_class, image_size=image_size, files=len(jobs)
    )
