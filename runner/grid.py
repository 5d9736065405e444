"""Labelled image grids from a results table, like A1111's X/Y/Z plot: one axis across, one down, a third as
separate pages. Axis values come in the order the sweep typed them (numbers sorted numerically); labels are drawn
in a TrueType font sized to the cell, wrapped when long; cells have a gutter and optional caption lines (time per
image, a metric). Grids are split into parts (or their cells shrunk) so that no PNG exceeds PIL's own pixel limit,
which would refuse to open it again (DecompressionBombError)."""

import functools
from dataclasses import dataclass
from pathlib import Path

from runner.columns import AXES

MIN_CELL = 128  # small model outputs are scaled up (nearest neighbour) so that labels and pixels stay readable
MAX_COLUMNS = 8
MAX_ROWS = 8
MAX_LABEL_LINES = 3
FONT_FILES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # Debian's fonts-dejavu-core
# Caption lines under each cell: how a column's value reads in a few characters.
CAPTION_FORMATS = {"time_per_image_s": "{:.2f} s/image", "time_per_step_s": "{:.3f} s/step",
                   "prompt_adherence": "adherence {:.2f}", "class_confidence": "confidence {:.2f}",
                   "clip_score": "CLIP {:.1f}", "psnr_to_ref": "{:.1f} dB to ref", "ssim_to_ref": "SSIM {:.3f}"}


# --------------------------------------------------------------------------- axes and their order

def multirun_overrides(sweep_dir: Path) -> list[str]:
    """The overrides a multirun was started with, as typed (multirun.yaml's hydra.overrides.task), followed by
    its sweeper's params (an experiment's sweep); [] where the sweep dir has no multirun.yaml."""
    import yaml

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return list((hydra.get("overrides") or {}).get("task") or []) + [f"{k}={v}" for k, v in params.items()]


@functools.lru_cache(maxsize=64)
def typed_sweep(sweep_dir: str, modified: float | None = None) -> dict[str, tuple]:
    """{key: its values in the order typed} for every swept or list-valued key of a sweep (not hydra.*); cached
    per sweep dir and multirun.yaml's modification time."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(multirun_overrides(Path(sweep_dir)))
    except Exception:  # a sweeper with its own syntax, an unreadable file: values fall back to first-seen order
        return {}
    typed = {}
    for override in overrides:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if override.is_sweep_override():
            values = list(override.sweep_iterator())
        elif isinstance(override.value(), list):
            values = override.value()
        else:
            continue
        typed[key] = tuple(str(getattr(v, "text", v)) for v in values)  # QuotedString → its text
    return typed


def typed_order(df) -> dict[str, list[str]]:
    """{key: values as typed, as text} over the sweeps of these rows, in the order the keys were typed."""
    order: dict[str, list[str]] = {}
    sweep_dirs = df["sweep_dir"] if "sweep_dir" in df else []
    for sweep_dir in dict.fromkeys(s for s in sweep_dirs if isinstance(s, str) and s):
        path = Path(sweep_dir) / "multirun.yaml"
        for key, values in typed_sweep(sweep_dir, path.stat().st_mtime if path.is_file() else None).items():
            known = order.setdefault(key, [])
            known += [v for v in values if v not in known]
    return order


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def ordered_values(df, axis: str, typed: dict | None = None) -> list:
    """The distinct values of `axis` in display order: numbers numerically, the rest in the order the sweep typed
    them, then any others in the order the rows hold them. Missing values are no axis value."""
    seen = [v for v in dict.fromkeys(df[axis].tolist()) if v is not None and v == v]
    typed = (typed_order(df) if typed is None else typed).get(axis, [])
    numbers = sorted(v for v in seen if is_number(v))
    others = [v for v in seen if not is_number(v)]
    others.sort(key=lambda v: typed.index(str(v)) if str(v) in typed else len(typed))  # stable: first-seen after
    return numbers + others


def swept_axes(df) -> list[str]:
    """The columns that take more than one value in these rows: keys in the order the sweep typed them, then the
    other AXES."""
    # Missing values don't count: a point refused before it ran records only the axes it was given.
    candidates = list(dict.fromkeys([*typed_order(df), *AXES]))
    return [a for a in candidates if a in df.columns and df[a].nunique(dropna=True) > 1]


def default_grid_axes(df) -> tuple[str | None, str | None]:
    """Columns and rows for a sweep's grid: the first two swept axes (seed last, when others are swept)."""
    axes = sorted(swept_axes(df), key=lambda a: a == "seed")
    return (axes[0] if axes else None), (axes[1] if len(axes) > 1 else None)


def default_grid_axes_xyz(df) -> tuple[str | None, str | None, str | None]:
    """Columns, rows and pages: the first three swept axes (seed last, when others are swept)."""
    axes = sorted(swept_axes(df), key=lambda a: a == "seed") + [None, None, None]
    return axes[0], axes[1], axes[2]


# --------------------------------------------------------------------------- text

@functools.lru_cache(maxsize=16)
def font(size: int):
    """A TrueType font of `size` pixels: DejaVu Sans where installed, else Pillow's own scalable default."""
    from PIL import ImageFont

    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def font_size(cell: int) -> int:
    """Label size for a cell width: readable at 100% on small cells, not shouting on large ones."""
    return max(14, min(40, cell // 12))


def wrap(text: str, width: float, face, max_lines: int = MAX_LABEL_LINES) -> list[str]:
    """`text` broken into lines no wider than `width` (at spaces, else within a word); the last line kept ends with
    "…" when more would not fit."""
    lines, line = [], ""
    for word in str(text).split(" "):
        candidate = f"{line} {word}" if line else word
        if face.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while face.getlength(word) > width and len(word) > 1:  # a word wider than the cell: split it
            cut = max(1, max(n for n in range(1, len(word) + 1) if face.getlength(word[:n]) <= width or n == 1))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and face.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "…"]
    return lines


def caption_lines(row: dict, captions) -> list[str]:
    lines = []
    for column in captions:
        value = row.get(column)
        if is_number(value):
            lines.append(CAPTION_FORMATS.get(column, column + " {:.3g}").format(value))
    return lines


# --------------------------------------------------------------------------- drawing

def first_image_size(df) -> tuple[int, int] | None:
    from PIL import Image

    first = next((p for p in df.get("image_path", []) if isinstance(p, str) and p and Path(p).is_file()), None)
    if first is None:
        return None
    with Image.open(first) as image:
        return image.size


def cell_images(df, columns, rows) -> dict:
    """{(row value, column value): the first ok row of that cell, as a dict}."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    cells = {}
    for row in ok.to_dict("records"):
        key = (row[rows] if rows else None, row[columns] if columns else None)
        cells.setdefault(key, row)
    return cells


@dataclass
class Layout:
    """Where everything goes in one grid image (pixels)."""
    cell_w: int
    cell_h: int
    gutter: int
    pad: int
    label: object  # the label font
    small: object  # the caption font
    title_lines: list
    column_labels: list  # wrapped lines per column
    row_labels: list  # wrapped lines per row
    margin: int  # width of the row-label column
    head: int  # height above the first row of cells
    caption_h: int  # height of the caption lines under each cell
    width: int
    height: int


def layout(cell_w: int, cell_h: int, title: str, columns, rows, column_values, row_values, n_captions: int) -> Layout:
    size = font_size(cell_w)
    label, small = font(size), font(max(12, size * 4 // 5))
    line, small_line = size + size // 4, max(12, size * 4 // 5) + 3
    pad, gutter = max(4, size // 3), max(2, cell_w // 40)
    # Row labels: as wide as they need, up to about one cell (then wrapped).
    margin = 0
    if rows:
        widest = max([label.getlength(str(v)) for v in row_values] + [label.getlength(f"{rows} ↓")])
        margin = int(min(widest, max(cell_w, 8 * size))) + 2 * pad
    width_for_title = max(margin + (cell_w + gutter) * len(column_values), 20 * size)
    title_lines = wrap(title, width_for_title - 2 * pad, label) if title else []
    column_labels = [wrap(str(v), cell_w, label) if columns else [] for v in column_values]
    row_labels = [wrap(str(v), margin - 2 * pad, label) if rows else [] for v in row_values]
    head = pad + len(title_lines) * line
    if columns:
        head += line + max(len(lines) for lines in column_labels) * line  # the axis name, then the values
    elif rows:
        head += line  # room for the rows' axis name
    head += pad
    caption_h = n_captions * small_line
    width = max(margin + (cell_w + gutter) * len(column_values) + pad, width_for_title)
    height = head + (cell_h + caption_h + gutter) * len(row_values) + pad
    return Layout(cell_w, cell_h, gutter, pad, label, small, title_lines, column_labels, row_labels, margin, head,
                  caption_h, int(width), int(height))


def pixel_limit() -> int | None:
    """PIL's own limit: a larger PNG warns on opening, twice as large is refused (DecompressionBombError)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def grid_image(df, columns: str | None, rows: str | None, cell: int | None = None, title: str = "",
               column_values=None, row_values=None, captions=()):
    """One PIL image: `columns` values across, `rows` values down, each cell the first image of that pair.

    A cell without an ok image (a failed or missing point) is a grey box with a cross, never an error.
    `title` is drawn above the grid (a page's axis and value); the values default to those in `df`, in the order
    typed. `captions` names columns printed under each cell (time_per_image_s, prompt_adherence ...). Cells are
    shrunk where the whole would exceed PIL's pixel limit (grid_pages splits instead).
    """
    from PIL import Image, ImageDraw

    if column_values is None:
        column_values = ordered_values(df, columns) if columns else [None]
    if row_values is None:
        row_values = ordered_values(df, rows) if rows else [None]
    size = first_image_size(df) or (MIN_CELL, MIN_CELL)
    cell_w = cell or max(size[0], MIN_CELL)
    cell_h = max(1, round(cell_w * size[1] / size[0]))
    plan = layout(cell_w, cell_h, title, columns, rows, column_values, row_values, len(captions))
    limit = pixel_limit()
    while limit and plan.width * plan.height > limit and plan.cell_w > 16:
        scale = 0.9 * (limit / (plan.width * plan.height)) ** 0.5
        cell_w = max(16, int(plan.cell_w * scale))
        cell_h = max(1, round(cell_w * size[1] / size[0]))
        plan = layout(cell_w, cell_h, title, columns, rows, column_values, row_values, len(captions))
    grid = Image.new("RGB", (plan.width, plan.height), "white")
    draw = ImageDraw.Draw(grid)
    draw_labels(draw, plan, columns, rows)
    cells = cell_images(df, columns, rows)
    step_x, step_y = plan.cell_w + plan.gutter, plan.cell_h + plan.caption_h + plan.gutter
    for i, rv in enumerate(row_values):
        for j, cv in enumerate(column_values):
            x, y = plan.margin + j * step_x, plan.head + i * step_y
            row = cells.get((rv, cv))
            path = row.get("image_path") if row else None
            if isinstance(path, str) and path and Path(path).is_file():
                with Image.open(path) as image:
                    grid.paste(fitted(image.convert("RGB"), plan.cell_w, plan.cell_h), (x, y))
            else:
                right, bottom = x + plan.cell_w - 1, y + plan.cell_h - 1
                draw.rectangle([x, y, right, bottom], fill=(200, 200, 200), outline=(120, 120, 120))
                draw.line([x, y, right, bottom], fill=(150, 0, 0), width=2)
                draw.line([x, bottom, right, y], fill=(150, 0, 0), width=2)
            for n, text in enumerate(caption_lines(row or {}, captions)):
                text = wrap(text, plan.cell_w, plan.small, max_lines=1)[0]
                draw.text((x, y + plan.cell_h + 2 + n * (plan.caption_h // len(captions))), text, fill=(60, 60, 60),
                          font=plan.small)
    return grid


def draw_labels(draw, plan: Layout, columns, rows) -> None:
    """The title, the axis names (columns over the values across, rows in the corner) and each value's label."""
    face, pad = plan.label, plan.pad
    line = face.size + face.size // 4
    y = pad
    for text in plan.title_lines:
        draw.text((pad, y), text, fill="black", font=face)
        y += line
    if columns:
        draw.text((plan.margin, y), f"{columns} →", fill=(90, 90, 90), font=face)
        y += line
        for j, lines in enumerate(plan.column_labels):
            for n, text in enumerate(lines):
                draw.text((plan.margin + j * (plan.cell_w + plan.gutter), y + n * line), text, fill="black", font=face)
    if rows:
        draw.text((pad, plan.head - pad - line), f"{rows} ↓", fill=(90, 90, 90), font=face)
        step = plan.cell_h + plan.caption_h + plan.gutter
        for i, lines in enumerate(plan.row_labels):
            top = plan.head + i * step + max(0, (plan.cell_h - len(lines) * line) // 2)
            for n, text in enumerate(lines):
                draw.text((pad, top + n * line), text, fill="black", font=face)


def fitted(image, width: int, height: int):
    """`image` at the cell's size: nearest neighbour when enlarging (crisp pixels), Lanczos when shrinking."""
    from PIL import Image

    if image.size == (width, height):
        return image
    enlarging = width >= image.width and height >= image.height
    return image.resize((width, height), Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS)


def _chunks(values: list, size: int) -> list[list]:
    return [values[i:i + size] for i in range(0, len(values), size)] or [[None]]


def part_shape(df, columns, rows, column_values, row_values, max_columns: int, max_rows: int, captions=(),
               title: str = "") -> tuple[int, int]:
    """The most columns and rows per part (at most max_columns × max_rows) whose grid stays within PIL's limit at
    full cell size; 1 × 1 when even one cell would not (grid_image then shrinks it)."""
    limit = pixel_limit()
    size = first_image_size(df) or (MIN_CELL, MIN_CELL)
    cell_w = max(size[0], MIN_CELL)
    cell_h = max(1, round(cell_w * size[1] / size[0]))
    n_columns, n_rows = min(max_columns, len(column_values)), min(max_rows, len(row_values))
    while limit and (n_columns > 1 or n_rows > 1):
        plan = layout(cell_w, cell_h, title + " part 99/99", columns, rows, column_values[:n_columns],
                      row_values[:n_rows], len(captions))
        if plan.width * plan.height <= limit:
            break
        if n_columns >= n_rows:
            n_columns -= 1
        else:
            n_rows -= 1
    return max(1, n_columns), max(1, n_rows)


def grid_pages(df, columns: str | None, rows: str | None, pages: str | None = None,
               max_columns: int = MAX_COLUMNS, max_rows: int = MAX_ROWS, captions=()) -> list[tuple[str, object]]:
    """The X/Y/Z plot: one grid per `pages` value, each split into parts of at most max_columns × max_rows cells,
    fewer where a part would exceed PIL's pixel limit.

    Returns (title, PIL image) pairs; the title names the page value and the part ("part 2/4") when split.
    """
    typed = typed_order(df)
    column_values = ordered_values(df, columns, typed) if columns else [None]
    row_values = ordered_values(df, rows, typed) if rows else [None]
    page_values = ordered_values(df, pages, typed) if pages else [None]
    n_columns, n_rows = part_shape(df, columns, rows, column_values, row_values, max_columns, max_rows, captions,
                                   f"{pages}: {max(map(str, page_values), key=len)}" if pages else "")
    result = []
    for page in page_values:
        selected = df[df[pages] == page] if pages else df
        parts = [(c, r) for r in _chunks(row_values, n_rows) for c in _chunks(column_values, n_columns)]
        for n, (column_part, row_part) in enumerate(parts, 1):
            title = ", ".join(t for t in (f"{pages}: {page}" if pages else "",
                                          f"part {n}/{len(parts)}" if len(parts) > 1 else "") if t)
            result.append((title, grid_image(selected, columns, rows, title=title, column_values=column_part,
                                             row_values=row_part, captions=captions)))
    return result
