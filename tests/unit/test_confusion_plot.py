"""The confusion matrix figure every job logs (worker/confusion_plot.py): a readable PNG,
rows as true classes, bounded at any class count."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from worker.confusion_plot import MATRIX_MAX_PX, confusion_png


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def blue_centroid(png: bytes) -> tuple[float, float]:
    """(row, column) mean of the strongly blue pixels: where the large counts are drawn."""
    rgb = pixels(png)
    rows, columns = np.nonzero(rgb[..., 2] - rgb[..., 0] > 60)
    assert rows.size, "no dark cell drawn"
    return rows.mean(), columns.mean()


def test_a_large_count_is_drawn_in_its_row_and_column() -> None:
    names = ["cat", "dog"]
    top_left = blue_centroid(confusion_png([[9, 0], [0, 0]], names))
    bottom_right = blue_centroid(confusion_png([[0, 0], [0, 9]], names))
    off_diagonal = blue_centroid(confusion_png([[0, 9], [0, 0]], names))  # true cat, predicted dog
    assert top_left[0] < bottom_right[0] and top_left[1] < bottom_right[1]
    assert abs(off_diagonal[0] - top_left[0]) < 1 and off_diagonal[1] > top_left[1]  # same row, next column


def test_the_figure_stays_bounded_and_readable_at_any_class_count() -> None:
    for n in (1, 10, 31, 101, 1000):
        counts = (np.arange(n * n).reshape(n, n) % 7).tolist()
        height, width, _ = pixels(confusion_png(counts, [f"class-{i}" * 3 for i in range(n)])).shape
        assert max(height, width) <= MATRIX_MAX_PX + 500, (n, width, height)


def test_an_all_zero_matrix_and_long_names_draw() -> None:
    png = confusion_png([[0, 0], [0, 0]], ["a" * 300, "b"])
    assert pixels(png).shape[1] < 1000  # names are cut, not drawn at full length
