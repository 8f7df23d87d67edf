"""The picture of a heatmap Secondary Capture: the radiograph in gray with the heatmap blended over it in colour,
between two text strips: the warnings above, the result in words and a colour legend below.

The text lies in strips of its own rather than over the radiograph, so that it never hides the bones or the
place where the heatmap peaks. The font is the one built into Pillow (``ImageFont.load_default``, scalable with
the FreeType support of Pillow's wheels), sized with the picture so that the text stays legible on a small
thumbnail and on a large screen alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from inference.predict import Heatmap

MIN_SIZE = 512  # the smallest longest side of a picture that leaves most of it to the radiograph
TRANSPARENT_BELOW = 0.2  # heatmap values up to this show the radiograph untouched
MAX_OPACITY = 0.6  # at the heatmap's peak, the bones still show through the colour

_FONT_SHARE = 1 / 45  # font size as a share of the picture's longest side (the source's, up to max_size)
_MIN_FONT_PX = 12
_MIN_TEXT_WIDTH = 320  # strips are at least this wide (or the whole picture), however narrow the radiograph
_BACKGROUND = (0, 0, 0)
_WARNING_COLOUR = (255, 214, 0)
_TEXT_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class Caption:
    """The words of a picture: ``warnings`` above the radiograph, ``lines`` of the result below it, and
    ``legend``, what the colours show, right above the colour bar."""

    warnings: tuple[str, ...]
    lines: tuple[str, ...]
    legend: str


@dataclass(frozen=True)
class Picture:
    """The drawn picture (uint8, height x width x 3, RGB) and where the radiograph lies in it."""

    pixels: np.ndarray
    radiograph_box: tuple[int, int, int, int]  # x0, y0, width, height

    def to_picture(self, x: float, y: float, rows: int, columns: int) -> tuple[int, int]:
        """The picture pixel (x, y) showing point (``x``, ``y``) of a radiograph of ``rows`` x ``columns``."""
        x0, y0, width, height = self.radiograph_box
        return x0 + int(x * width / columns), y0 + int(y * height / rows)


def render(radiograph: np.ndarray, heatmap: Heatmap, caption: Caption, max_size: int) -> Picture:
    """The picture of ``radiograph`` with ``heatmap`` over it and ``caption`` around it; its longest side is at
    most ``max_size``.

    ``radiograph`` is the image the heatmap was computed on as :func:`dicom_node.outputs.preview.preview` makes it
    (gray uint8, bone bright, scaled down): the picture is drawn from it at the size it shows the image, and the
    heatmap resized to that size once.
    """
    rows, columns = heatmap.letterbox.rows, heatmap.letterbox.columns
    if radiograph.dtype != np.uint8:
        raise ValueError(f"the radiograph must be gray uint8 as its preview is, not {radiograph.dtype}")
    _check_scaled_copy(radiograph.shape, rows, columns)
    if max_size < MIN_SIZE:
        raise ValueError(f"max_size must be at least {MIN_SIZE} pixels to hold the text, not {max_size}")
    width, height, font = _fit((rows, columns), caption, max_size)
    canvas_width = _canvas_width(width, max_size)
    overlay = blend(resized(radiograph, width, height), heatmap.resized(width, height))
    middle = Image.new("RGB", (canvas_width, height), _BACKGROUND)
    x0 = (canvas_width - width) // 2
    middle.paste(Image.fromarray(overlay), (x0, 0))
    top = _text_strip(caption.warnings, font, canvas_width, _WARNING_COLOUR)
    bottom = _text_strip((*caption.lines, caption.legend), font, canvas_width, _TEXT_COLOUR)
    pixels = np.asarray(_stack([top, middle, bottom, _colour_bar(font, canvas_width)]))
    return Picture(pixels, (x0, top.height, width, height))


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (dark blue, blue, cyan, yellow, red, dark red) of ``values`` in [0, 1], as float RGB."""
    v = np.asarray(values, np.float32)[..., None]
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # where red, green and blue are brightest
    return np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)


def blend(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``gray`` (uint8) as RGB with ``heat`` (float in [0, 1], the same shape) over it in jet colours, transparent
    where the heat is low. The heat is taken in 256 steps, whose colour and opacity are looked up in tables, and
    Pillow lays the colours over the radiograph."""
    level = np.rint(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
    colours, opacity = Image.fromarray(_JET_TABLE[level]), Image.fromarray(_OPACITY_TABLE[level])
    return np.asarray(Image.composite(colours, Image.fromarray(gray).convert("RGB"), opacity))


def _opacity(heat: np.ndarray) -> np.ndarray:
    return MAX_OPACITY * np.clip((heat - TRANSPARENT_BELOW) / (1.0 - TRANSPARENT_BELOW), 0.0, 1.0)


_LEVELS = np.linspace(0.0, 1.0, 256, dtype=np.float32)
_JET_TABLE = np.rint(jet(_LEVELS) * 255.0).astype(np.uint8)
_OPACITY_TABLE = np.rint(_opacity(_LEVELS) * 255.0).astype(np.uint8)


def _fit(shape: tuple[int, int], caption: Caption, max_size: int) -> tuple[int, int, ImageFont.FreeTypeFont]:
    """Width and height of the radiograph in the picture, and the font, such that radiograph and strips together
    fit in ``max_size``. Each try shortens the radiograph to leave room for the strips of the last; narrower, the
    strips can only need more lines, and never more than ``max_size`` holds, so the tries end."""
    rows, columns = shape
    font = _font(max(_MIN_FONT_PX, round(min(max_size, max(rows, columns)) * _FONT_SHARE)))
    scale = min(1.0, max_size / max(rows, columns))
    while True:
        width, height = max(int(columns * scale), 1), max(int(rows * scale), 1)
        strips = _strips_height(caption, font, _canvas_width(width, max_size))
        if height + strips <= max_size:
            return width, height, font
        if strips >= max_size:
            raise ValueError(f"the text needs {strips} pixels of height: a picture of {max_size} has no room left")
        scale = (max_size - strips) / rows


def _canvas_width(width: int, max_size: int) -> int:
    return max(width, min(_MIN_TEXT_WIDTH, max_size))


def _strips_height(caption: Caption, font: ImageFont.FreeTypeFont, width: int) -> int:
    warnings = _wrap(caption.warnings, font, width - 2 * _margin(font))
    lines = _wrap((*caption.lines, caption.legend), font, width - 2 * _margin(font))
    return _strip_height(len(warnings), font) + _strip_height(len(lines), font) + _colour_bar_height(font)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """The font of ``size`` pixels, one object per size: the layouts below are cached by font."""
    return ImageFont.load_default(size=size)


# Most words recur from picture to picture (the warnings, the legend, the class names), and pictures of a size
# share their font and width: the strips and line breaks are laid out once per text, font and width. The cached
# strips are shared by every picture (and thread) that pastes them: they are read, never drawn on.
@functools.lru_cache(maxsize=16)
def _text_strip(
    texts: tuple[str, ...], font: ImageFont.FreeTypeFont, width: int, colour: tuple[int, int, int]
) -> Image.Image:
    """``texts`` wrapped to ``width``, one line under the other, on a black strip."""
    lines = _wrap(texts, font, width - 2 * _margin(font))
    strip = Image.new("RGB", (width, _strip_height(len(lines), font)), _BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for number, line in enumerate(lines):
        draw.text((_margin(font), _margin(font) + number * _line_height(font)), line, font=font, fill=colour)
    return strip


@functools.lru_cache(maxsize=64)
def _colour_bar(font: ImageFont.FreeTypeFont, width: int) -> Image.Image:
    """The colour map from "low" to "high": the legend of the heatmap's colours."""
    margin, line = _margin(font), _line_height(font)
    strip = Image.new("RGB", (width, _colour_bar_height(font)), _BACKGROUND)
    draw = ImageDraw.Draw(strip)
    bar_start = margin + round(draw.textlength("low ", font=font))
    high_start = width - margin - round(draw.textlength("high", font=font))
    bar_end = high_start - round(draw.textlength(" ", font=font))
    bar_length, bar_height = max(bar_end - bar_start, 1), max(font.size // 2, 4)
    bar = (jet(np.linspace(0.0, 1.0, bar_length))[None] * 255).astype(np.uint8)
    strip.paste(Image.fromarray(np.repeat(bar, bar_height, axis=0)), (bar_start, (line - bar_height) // 2))
    draw.text((margin, 0), "low", font=font, fill=_TEXT_COLOUR)
    draw.text((high_start, 0), "high", font=font, fill=_TEXT_COLOUR)
    return strip


@functools.lru_cache(maxsize=512)
def _wrap(texts: tuple[str, ...], font: ImageFont.FreeTypeFont, width: int) -> tuple[str, ...]:
    """Each text broken into lines no wider than ``width`` at spaces (a single longer word keeps its line)."""
    lines = []
    for text in texts:
        line = ""
        for word in text.split():
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return tuple(lines)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return round((ascent + descent) * 1.15)


def _margin(font: ImageFont.FreeTypeFont) -> int:
    return max(font.size // 2, 4)


def _strip_height(lines: int, font: ImageFont.FreeTypeFont) -> int:
    return lines * _line_height(font) + 2 * _margin(font)


def _colour_bar_height(font: ImageFont.FreeTypeFont) -> int:
    return _line_height(font) + _margin(font)


def _check_scaled_copy(shape: tuple[int, ...], rows: int, columns: int) -> None:
    """Raise ValueError unless ``shape`` is that of the ``rows`` x ``columns`` image, scaled (within rounding)."""
    if len(shape) != 2 or not (
        abs(shape[0] - rows * shape[1] / columns) <= 1.5 or abs(shape[1] - columns * shape[0] / rows) <= 1.5
    ):
        raise ValueError(
            f"the radiograph is {shape}, not a scaled copy of the {rows} x {columns} image the heatmap was computed on"
        )


def resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float32 or uint8 image resized to ``width`` x ``height`` (antialiased when shrinking)."""
    picture = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(picture)


def _stack(strips: list[Image.Image]) -> Image.Image:
    """Images of the same width, one under the other."""
    picture = Image.new("RGB", (strips[0].width, sum(strip.height for strip in strips)), _BACKGROUND)
    top = 0
    for strip in strips:
        picture.paste(strip, (0, top))
        top += strip.height
    return picture
