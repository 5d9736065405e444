"""Labelled image grids from a results table, like A1111's X/Y/Z plot: one axis across, one down, a third as
separate pages; grids larger than MAX_COLUMNS × MAX_ROWS are split into several images."""

from pathlib import Path

from runner.columns import AXES

LABEL_HEIGHT = 18
MAX_LABEL_CHARS = 24
MIN_CELL = 128  # small model outputs are scaled up so that labels and details stay readable
MAX_COLUMNS = 8
MAX_ROWS = 8


def swept_axes(df) -> list[str]:
    """The axis columns that take more than one value in these rows, in AXES order."""
    # Missing values don't count: a point refused before it ran records only the axes it was given.
    return [a for a in AXES if a in df.columns and df[a].nunique(dropna=True) > 1]


def _ordered(values):
    try:
        return sorted(set(values))
    except TypeError:
        return list(dict.fromkeys(values))


def _label(value) -> str:
    text = str(value)
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def grid_image(df, columns: str | None, rows: str | None, cell: int | None = None, title: str = "",
               column_values=None, row_values=None):
    """One PIL image: `columns` values across, `rows` values down, each cell the first image of that pair.

    A cell without an ok image (a failed or missing point) is a grey box with a cross, never an error.
    `title` is drawn above the grid (a page's axis and value); the values default to those in `df`.
    """
    from PIL import Image, ImageDraw

    if column_values is None:
        column_values = _ordered(df[columns]) if columns else [None]
    if row_values is None:
        row_values = _ordered(df[rows]) if rows else [None]
    if cell is None:
        first = next((p for p in df.get("image_path", []) if isinstance(p, str) and p and Path(p).is_file()), None)
        cell = max(Image.open(first).width if first else 0, MIN_CELL)
    margin = 6 * max([len(_label(v)) for v in row_values] + [len(rows) + 6]) + 8 if rows else 0
    head = LABEL_HEIGHT if title else 0
    top = head + (2 * LABEL_HEIGHT if columns else LABEL_HEIGHT)
    width = max(margin + cell * len(column_values), 6 * len(title) + 8)
    grid = Image.new("RGB", (width, top + cell * len(row_values)), "white")
    draw = ImageDraw.Draw(grid)
    # Axis names once (columns along the top, rows in the corner), values beside each column and row.
    if title:
        draw.text((2, 3), title, fill="black")
    if columns:
        draw.text((margin + 2, head + 3), f"columns: {columns}", fill="black")
    if rows:
        draw.text((2, top - LABEL_HEIGHT + 3), f"rows: {rows}", fill="black")
    for j, cv in enumerate(column_values):
        if columns:
            draw.text((margin + j * cell + 2, top - LABEL_HEIGHT + 3), _label(cv), fill="black")
    for i, rv in enumerate(row_values):
        if rows:
            draw.text((2, top + i * cell + cell // 2 - 5), _label(rv), fill="black")
        for j, cv in enumerate(column_values):
            selected = df
            if columns:
                selected = selected[selected[columns] == cv]
            if rows:
                selected = selected[selected[rows] == rv]
            ok = selected[selected["status"] == "ok"] if "status" in selected else selected
            x, y = margin + j * cell, top + i * cell
            path = ok["image_path"].iloc[0] if len(ok) else None
            if path and Path(path).is_file():
                grid.paste(Image.open(path).convert("RGB").resize((cell, cell)), (x, y))
            else:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200), outline=(120, 120, 120))
                draw.line([x, y, x + cell - 1, y + cell - 1], fill=(150, 0, 0), width=2)
                draw.line([x, y + cell - 1, x + cell - 1, y], fill=(150, 0, 0), width=2)
    return grid


def default_grid_axes(df) -> tuple[str | None, str | None]:
    """Columns and rows for a sweep's grid: the first two swept axes (seed last, when others are swept)."""
    axes = sorted(swept_axes(df), key=lambda a: a == "seed")
    return (axes[0] if axes else None), (axes[1] if len(axes) > 1 else None)


def _chunks(values: list, size: int) -> list[list]:
    return [values[i:i + size] for i in range(0, len(values), size)] or [[None]]


def grid_pages(df, columns: str | None, rows: str | None, pages: str | None = None,
               max_columns: int = MAX_COLUMNS, max_rows: int = MAX_ROWS) -> list[tuple[str, object]]:
    """The X/Y/Z plot: one grid per `pages` value, each split into parts of at most max_columns × max_rows cells.

    Returns (title, PIL image) pairs; the title names the page value and the part ("part 2/4") when split.
    """
    column_values = _ordered(df[columns]) if columns else [None]
    row_values = _ordered(df[rows]) if rows else [None]
    page_values = _ordered(df[pages]) if pages else [None]
    result = []
    for page in page_values:
        selected = df[df[pages] == page] if pages else df
        parts = [(c, r) for r in _chunks(row_values, max_rows) for c in _chunks(column_values, max_columns)]
        for n, (column_part, row_part) in enumerate(parts, 1):
            title = ", ".join(t for t in (f"{pages}: {_label(page)}" if pages else "",
                                          f"part {n}/{len(parts)}" if len(parts) > 1 else "") if t)
            result.append((title, grid_image(selected, columns, rows, title=title, column_values=column_part,
                                             row_values=row_part)))
    return result


def default_grid_axes_xyz(df) -> tuple[str | None, str | None, str | None]:
    """Columns, rows and pages: the first three swept axes (seed last, when others are swept)."""
    axes = sorted(swept_axes(df), key=lambda a: a == "seed") + [None, None, None]
    return axes[0], axes[1], axes[2]
