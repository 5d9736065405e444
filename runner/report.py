"""`python -m runner.report PATH [PATH ...] [--out DIR]`: one self-contained HTML sweep viewer of one or more sweeps.

report.html shows the images as a grid (any swept key across, down or per page, the others as filters), a
cell's detail (metadata, sigma schedule, the command that redraws it), an A/B compare (side by side, wipe, flicker,
difference; synced zoom), interactive charts (runner.viewer_charts) and the results table. Thumbnails are
embedded; the full PNGs and the labelled grid PNGs are placed beside it (runner.viewer), so the report folder opens
offline, with no server, wherever it is copied. Default: <first PATH>/report/.
"""

import argparse
import html
import json
import re
import sys
from pathlib import Path

from runner.columns import QUALITY_COLUMNS
from runner.record import atomic_write_bytes

MANIFEST = "report_files.txt"  # the files a report wrote: the next report into the same dir removes only those
ASSETS = Path(__file__).parent / "report_assets"
GRID_CAPTIONS = ("time_per_image_s", *QUALITY_COLUMNS)  # caption lines under each cell of the grid PNGs
# Tables under the charts: functions that take the results DataFrame and return (title, DataFrame), or None when
# the rows hold nothing for them (a quality table, say). Each is shown as a plain HTML table.
TABLES: list = []


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(text))[:80] or "all"


def grid_files(df, out: Path) -> list[tuple[str, Path]]:
    """One set of X/Y/Z grid PNGs per sweep (for papers and slides): (caption, PNG path) pairs."""
    from runner.grid import default_grid_axes_xyz, grid_pages

    files = []
    for sweep, rows in df.groupby("sweep", sort=False, dropna=False):
        columns, row_axis, pages = default_grid_axes_xyz(rows)
        legend = ", ".join(f"{k}: {v}" for k, v in (("columns", columns), ("rows", row_axis), ("pages", pages)) if v)
        captions = [c for c in GRID_CAPTIONS if c in rows and rows[c].notna().any()]
        for n, (title, image) in enumerate(grid_pages(rows, columns, row_axis, pages, captions=captions)):
            path = out / f"grid_{slug(sweep)}_{n:02d}.png"
            image.save(path)
            files.append((f"{sweep or 'single runs'}: {legend or 'one image'}{' — ' + title if title else ''}", path))
    return files


def grids_html(grids: list[tuple[str, Path]]) -> str:
    if not grids:
        return ""
    items = "".join(f"<figure><a href='{html.escape(p.name)}'><img loading='lazy' src='{html.escape(p.name)}' "
                    f"alt='{html.escape(p.name)}' style='max-width:100%'></a><figcaption>{html.escape(caption)} "
                    f"<small>({html.escape(p.name)})</small></figcaption></figure>" for caption, p in grids)
    return f"<h2>Grid images (PNG, for papers and slides)</h2><div id='grid-pngs'>{items}</div>"


def tables_html(df) -> str:
    """The TABLES hook's tables, each under its title."""
    parts = []
    for table in TABLES:
        made = table(df)
        if made is not None:
            title, frame = made
            parts.append(f"<h2>{html.escape(title)}</h2>" + frame.to_html(classes="summary-table", border=0))
    return "\n".join(parts)


def summary_line(df) -> str:
    sweeps = list(dict.fromkeys(s for s in df["sweep"] if s))
    ok = int((df["status"] == "ok").sum())
    references = sorted({f"{s} at {n} steps" for s, n in zip(df.get("ref_scheduler", []), df.get("ref_steps", []))
                         if isinstance(s, str)})
    return (f"{len(df)} image(s), {ok} ok, {len(df) - ok} failed; sweeps: {', '.join(sweeps) or '(single runs)'}; "
            f"reference: {', '.join(references) or 'none'}")


def page_html(title: str, summary: str, data: dict, tables: str, grids: str) -> str:
    """The page: the template with its styles, the viewer's script and data, and plotly.js, all inline."""
    import plotly.offline

    from runner.viewer import script_json

    parts = {"TITLE": html.escape(title), "SUMMARY": html.escape(summary), "TABLES": tables, "GRIDS": grids,
             "CSS": (ASSETS / "viewer.css").read_text(), "VIEWER_JS": (ASSETS / "viewer.js").read_text(),
             "DATA": script_json(data), "PLOTLY_JS": plotly.offline.get_plotlyjs()}
    # One pass over the template: text put in (plotly.js, the data) is never searched for placeholders again.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], (ASSETS / "page.html").read_text())


def earlier_files(out: Path) -> list[str]:
    """The files an earlier report into `out` wrote, as its manifest names them (none without a manifest): PNGs
    directly in `out` and files under its images/ folder, never a path that leaves `out`."""
    from runner.viewer import IMAGES_DIR

    manifest = out / MANIFEST
    names = manifest.read_text().splitlines() if manifest.is_file() else []
    return [n for n in names if n.endswith(".png") and ".." not in Path(n).parts and not Path(n).is_absolute()
            and (n == Path(n).name or Path(n).parts[0] == IMAGES_DIR)]


def remove_stale(out: Path, earlier: list[str], written: list[str]) -> None:
    """Remove what an earlier report wrote and this one did not, and the folders of images/ that this leaves empty."""
    for name in set(earlier) - set(written):
        path = out / name
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == out or out not in folder.parents:
                break
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break


def write_report(df, out: Path, reference=None, reference_scheduler: str | None = None) -> Path:
    """Write report.html, its grid PNGs and full images into `out`, and the manifest naming them; returns the
    HTML's path."""
    from runner.convergence import add_convergence
    from runner.quality import report_section
    from runner.viewer import viewer_data
    from runner.viewer_charts import charts

    out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_files(out)
    converged = "ref_converged" in df and df["ref_converged"].notna().any()  # the sweep's own reference=auto
    if reference is not None or not converged:
        df = add_convergence(df, reference=reference, scheduler=reference_scheduler)
    df = df.reset_index(drop=True)
    sweeps = list(dict.fromkeys(s for s in df["sweep"] if s))
    title = f"Sweep report: {', '.join(sweeps) or 'runs'}"
    grids = grid_files(df, out)
    data, placed = viewer_data(df, out)
    data["charts"] = [{"name": name, "figure": json.loads(figure)} for name, figure in charts(df)]
    # quality against NFE (runner.quality): Plotly figures and paper-style tables with intervals
    page = page_html(title, summary_line(df), data, tables_html(df) + report_section(df), grids_html(grids))
    path = out / "report.html"
    atomic_write_bytes(path, page.encode())
    written = [p.name for _, p in grids] + placed
    atomic_write_bytes(out / MANIFEST, "".join(f"{name}\n" for name in written).encode())
    # Only files of an earlier report (grids with other axes ...): `--out` can name a dir of the user's own files.
    remove_stale(out, earlier, written)
    return path


def main(argv=None) -> int:
    from runner import results

    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dirs, job dirs or results trees")
    parser.add_argument("--out", type=Path, help="where report.html goes (default: <first PATH>/report)")
    parser.add_argument("--reference", type=Path, help="a separate reference run, or auto: converged references "
                                                         "(runner.reference; default: within the sweep)")
    parser.add_argument("--reference-scheduler", help="the reference scheduler (default: the one with most steps)")
    args = parser.parse_args(argv)
    for path in args.paths + ([args.reference] if args.reference and str(args.reference) != "auto" else []):
        if not path.exists():
            print(f"error: path={str(path)!r} is not allowed: an existing sweep dir, job dir or results tree",
                  file=sys.stderr)
            return 2
    df = results.load(*args.paths)
    if df.empty:
        print(f"error: no result rows (rows.parquet) under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    path = write_report(df, args.out or args.paths[0] / "report", args.reference, args.reference_scheduler)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
