"""Grid PNGs (runner.grid): readable labels, gutters, the order typed, wrapping, captions, PIL's pixel limit."""

import warnings

import numpy as np
import pytest

from runner import results
from runner.grid import (MAX_LABEL_LINES, caption_lines, font, font_size, grid_image, grid_pages, layout,
                         ordered_values, wrap)
from tests.conftest import fake_sweep, read_png


@pytest.fixture
def df(tmp_path):
    return results.load(fake_sweep(tmp_path / "sweep"))


def dark_rows(image, x0: int, x1: int, y0: int, y1: int) -> np.ndarray:
    """The rows of a region that hold text (dark pixels)."""
    pixels = np.asarray(image.convert("L"))[y0:y1, x0:x1]
    return np.flatnonzero((pixels < 100).any(axis=1))


def test_labels_are_a_truetype_font_sized_to_the_cell(df):
    from PIL import ImageFont

    assert isinstance(font(20), ImageFont.FreeTypeFont) and font(20).size == 20
    heights = {}
    for cell in (128, 512):
        image = grid_image(df, "scheduler", "steps", cell=cell)
        plan = layout(cell, cell, "", "scheduler", "steps", ["ddim", "euler"], [2, 4], 0)
        rows = dark_rows(image, plan.margin, plan.margin + cell, 0, plan.head)  # above the first column's cells
        line = font_size(cell) * 5 // 4
        labels = rows[rows >= plan.head - plan.pad - line]  # the column values' line (the axis name is above it)
        heights[cell] = labels.max() - labels.min() + 1
    assert heights[128] >= 10  # "ddim" at 100%: letters about 10 px high, not PIL's 6-px bitmap font
    assert heights[512] > 2 * heights[128]


def test_cells_have_a_gutter_and_come_in_the_order_typed(df, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - scheduler=euler,ddim\n"
                                         "    - steps=4,2\n")
    df = results.load(sweep)
    assert ordered_values(df, "scheduler") == ["euler", "ddim"] and ordered_values(df, "steps") == [2, 4]
    one_seed = df[df["seed"] == 0]
    image = np.asarray(grid_image(one_seed, "scheduler", "steps", cell=128))
    plan = layout(128, 128, "", "scheduler", "steps", ["euler", "ddim"], [2, 4], 0)
    first = image[plan.head:plan.head + 128, plan.margin:plan.margin + 128]
    euler_2 = one_seed[(one_seed["scheduler"] == "euler") & (one_seed["steps"] == 2)]["image_path"].iloc[0]
    assert np.array_equal(first, read_png(euler_2).repeat(8, axis=0).repeat(8, axis=1))  # 16 px, crisp ×8
    gutter = image[plan.head:plan.head + 128, plan.margin + 128:plan.margin + 128 + plan.gutter]
    assert plan.gutter >= 2 and (gutter == 255).all()  # white between cells
    below = image[plan.head + 128:plan.head + 128 + plan.gutter, plan.margin:plan.margin + 128]
    assert (below == 255).all()


def test_long_labels_are_wrapped_within_their_cell(df):
    face = font(14)
    prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed, cinematic lighting"
    lines = wrap(prompt, 128, face)
    assert 1 < len(lines) <= MAX_LABEL_LINES and lines[-1].endswith("…")
    assert all(face.getlength(line) <= 128 for line in lines)
    assert wrap("supercalifragilisticexpialidocious" * 2, 60, face)[0] != "supercalifragilisticexpialidocious" * 2
    long_prompts = df.assign(prompt=[f"{prompt} {n}" for n in df["seed"]])
    image = grid_image(long_prompts[long_prompts["steps"] == 2], "scheduler", "prompt", cell=128)
    assert image.width <= 2 * 128 + 128 + 200  # the row labels wrapped, not one 600-px line


def test_caption_lines_under_each_cell(df):
    row = df.iloc[0].to_dict() | {"prompt_adherence": 0.98765}
    assert caption_lines(row, ("time_per_image_s", "prompt_adherence", "clip_score")) == ["0.50 s/image",
                                                                                         "adherence 0.99"]
    plain = grid_image(df, "scheduler", "steps", cell=128)
    captioned = grid_image(df.assign(prompt_adherence=0.5), "scheduler", "steps", cell=128,
                           captions=("time_per_image_s", "prompt_adherence"))
    plan = layout(128, 128, "", "scheduler", "steps", ["ddim", "euler"], [2, 4], 2)
    assert captioned.height > plain.height and plan.caption_h > 0
    text = dark_rows(captioned, plan.margin, plan.margin + 128, plan.head + 128, plan.head + 128 + plan.caption_h)
    assert len(text) >= 10  # two lines of text under the first cell


def test_grids_larger_than_pils_limit_are_split_and_reopen(tmp_path, monkeypatch):
    from PIL import Image

    df = results.load(fake_sweep(tmp_path / "sweep", schedulers=("a", "b", "c", "d"), steps=(1, 2, 3, 4)))
    limit = 150_000  # 4 x 4 cells of 128 px do not fit, as 8 x 8 cells of 1,400 px do not fit PIL's 89.5 MP
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    assert (128 * 4) ** 2 > limit
    pages = grid_pages(df, "scheduler", "steps", "seed")
    parts_per_page = len(pages) // 2
    assert parts_per_page > 1 and all("part" in title for title, _ in pages)
    assert [t for t, _ in pages[:parts_per_page]] == [f"seed: 0, part {n}/{parts_per_page}"
                                                      for n in range(1, parts_per_page + 1)]
    for n, (title, image) in enumerate(pages):
        assert image.width * image.height <= limit
        path = tmp_path / f"part{n}.png"
        image.save(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL would warn above its limit
            Image.open(path).load()
    # a single grid (the sweep's grid.png) shrinks its cells instead of failing
    single = grid_image(df, "scheduler", "steps")
    assert single.width * single.height <= limit
