"""The confusion matrix as a PNG, drawn with Pillow rather than matplotlib.

Every job logs this figure before it may say `succeeded`, so its cost is part of every
job's end (and of every round of a study). matplotlib laid out and rasterised ~150 text
objects for a 10-class matrix: ~100 ms of CPU a job on this project's 2-core machine,
while the MLflow server and the other job share those cores. Here the cells are one
image scaled up (the colours are matplotlib's "Blues" map) and the text is drawn by
Pillow: a few milliseconds, the same content (counts, class names, axis titles).

Bounded at any class count: counts in the cells up to COUNTS_MAX_CLASSES classes, names
on the axes up to NAMES_MAX_CLASSES (cut to NAME_CHARS), the matrix at most MATRIX_MAX_PX
a side. Every count is in confusion_matrix.json.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib import colormaps, get_data_path
from PIL import Image, ImageDraw, ImageFont

COUNTS_MAX_CLASSES = 30
NAMES_MAX_CLASSES = 100
NAME_CHARS = 24
CELL_PX = 44  # a cell's side while the matrix fits in MATRIX_MAX_PX
MATRIX_MAX_PX = 1200
MARGIN_PX = 12
TITLE = "validation confusion matrix"


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # matplotlib's own DejaVu Sans: installed with it, and it has the ellipsis of cut names.
    return ImageFont.truetype(str(Path(get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def _names(class_names: list[str]) -> list[str]:
    return [name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…" for name in class_names]


def _text_width(font: ImageFont.FreeTypeFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def confusion_png(matrix: list[list[int]], class_names: list[str]) -> bytes:
    """The PNG's bytes: rows are true classes, columns predicted ones."""
    counts = np.asarray(matrix, dtype=np.int64).reshape(len(class_names), len(class_names))
    n = len(class_names)
    side = min(MATRIX_MAX_PX, max(1, n) * CELL_PX)
    top = counts.max() if counts.size else 0
    shades = colormaps["Blues"](counts / top if top else counts.astype(float), bytes=True)[..., :3]
    cells = Image.fromarray(np.ascontiguousarray(shades), "RGB")
    # Nearest keeps cells sharp when scaled up; box averages them when there are more cells than pixels.
    cells = cells.resize((side, side), Image.Resampling.NEAREST if side >= n else Image.Resampling.BOX)

    label_font, title_font = _font(12), _font(14)
    names = _names(class_names) if n <= NAMES_MAX_CLASSES else []
    name_font = _font(11 if n <= COUNTS_MAX_CLASSES else 7)
    names_px = max((_text_width(name_font, name) for name in names), default=0)
    x_title = "predicted" if names else f"predicted (class 0..{n - 1})"
    y_title = "true" if names else f"true (class 0..{n - 1})"
    left = MARGIN_PX + 18 + (names_px + 6 if names else 0)
    top_px = MARGIN_PX + 22
    bottom = (names_px + 6 if names else 0) + 18 + MARGIN_PX
    width = max(left + side + MARGIN_PX, _text_width(title_font, TITLE) + 2 * MARGIN_PX)
    image = Image.new("RGB", (width, top_px + side + bottom), "white")
    image.paste(cells, (left, top_px))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top_px - 1, left + side, top_px + side), outline="black")
    draw.text((width // 2, MARGIN_PX), TITLE, fill="black", font=title_font, anchor="mt")

    step = side / max(1, n)
    if n <= COUNTS_MAX_CLASSES:
        count_font = _font(11)
        for (i, j), count in np.ndenumerate(counts):
            colour = "white" if count > top / 2 else "black"
            centre = (left + (j + 0.5) * step, top_px + (i + 0.5) * step)
            draw.text(centre, str(count), fill=colour, font=count_font, anchor="mm")
    for i, name in enumerate(names):  # true classes, right-aligned left of their row
        draw.text((left - 4, top_px + (i + 0.5) * step), name, fill="black", font=name_font, anchor="rm")
    if names:  # predicted classes: drawn on a strip, turned upright under their columns
        strip = Image.new("RGB", (names_px + 6, side), "white")
        strip_draw = ImageDraw.Draw(strip)
        for j, name in enumerate(names):
            strip_draw.text((names_px + 2, (j + 0.5) * step), name, fill="black", font=name_font, anchor="rm")
        image.paste(strip.transpose(Image.Transpose.ROTATE_90), (left, top_px + side + 2))
    draw.text((left + side // 2, image.height - MARGIN_PX), x_title, fill="black", font=label_font, anchor="md")
    y_label = Image.new("RGB", (_text_width(label_font, y_title) + 4, 16), "white")
    ImageDraw.Draw(y_label).text((2, 8), y_title, fill="black", font=label_font, anchor="lm")
    y_label = y_label.transpose(Image.Transpose.ROTATE_90)
    image.paste(y_label, (MARGIN_PX, top_px + (side - y_label.height) // 2))

    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)  # fast; the figure is small either way
    return out.getvalue()
