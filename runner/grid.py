"""Labelled image grids from a results table, like A1111's X/Y plot: one axis across, one down."""

from pathlib import Path

AXES = ("model", "scheduler", "steps", "guidance", "seed", "prompt", "negative_prompt", "strength", "precision",
        "height", "width")
LABEL_HEIGHT = 18
MAX_LABEL_CHARS = 24
MIN_CELL = 128  # small model outputs are scaled up so that labels and details stay readable


def swept_axes(df) -> list[str]:
    """The axis columns that take more than one value in these rows, in AXES order."""
    return [a for a in AXES if a in df.columns and df[a].nunique(dropna=False) > 1]


def _ordered(values):
    try:
        return sorted(set(values))
    except TypeError:
        return list(dict.fromkeys(values))


def _label(value) -> str:
    text = str(value)
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def grid_image(df, columns: str | None, rows: str | None, cell: int | None = None):
    """One PIL image: `columns` values across, `rows` values down, each cell the first image of that pair.

    A cell without an ok image (a failed or missing point) is a grey box with a cross, never an error.
    """
    from PIL import Image, ImageDraw

    column_values = _ordered(df[columns]) if columns else [None]
    row_values = _ordered(df[rows]) if rows else [None]
    if cell is None:
        first = next((p for p in df.get("image_path", []) if isinstance(p, str) and p and Path(p).is_file()), None)
        cell = max(Image.open(first).width if first else 0, MIN_CELL)
    margin = 6 * max([len(_label(v)) for v in row_values] + [len(rows) + 6]) + 8 if rows else 0
    top = 2 * LABEL_HEIGHT if columns else LABEL_HEIGHT
    grid = Image.new("RGB", (margin + cell * len(column_values), top + cell * len(row_values)), "white")
    draw = ImageDraw.Draw(grid)
    # Axis names once (columns along the top, rows in the corner), values beside each column and row.
    if columns:
        draw.text((margin + 2, 3), f"columns: {columns}", fill="black")
    if rows:
        draw.text((2, top - LABEL_HEIGHT + 3), f"rows: {rows}", fill="black")
    for j, cv in enumerate(column_values):
        if columns:
            draw.text((margin + j * cell + 2, LABEL_HEIGHT + 3), _label(cv), fill="black")
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
