"""`python -m runner.report PATH [PATH ...] [--out DIR]`: one self-contained HTML report of one or more sweeps.

It holds labelled image grids (X/Y/Z), the sigma schedules, timing charts, convergence to a reference image and
the sortable results table. Every picture is also written as a PNG beside report.html and embedded in it
(data: URIs), so the page opens offline, with no server, wherever it is copied. Default: <first PATH>/report/.
"""

import argparse
import base64
import html
import sys
from pathlib import Path

from runner.columns import QUALITY_COLUMNS, REPORT_COLUMNS
from runner.jobdir import SCHEDULE_FILE
from runner.record import atomic_write_bytes

MANIFEST = "report_files.txt"  # the PNGs a report wrote: the next report into the same dir removes only those


def peak_memory_columns(df) -> list[str]:
    """Peak-memory columns, where the runner recorded them (named like `peak_memory_mb`)."""
    return [c for c in df.columns if "peak" in c and "mem" in c]


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(text))[:80] or "all"


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def grid_files(df, out: Path) -> list[tuple[str, Path]]:
    """One set of X/Y/Z grids per sweep: (caption, PNG path) pairs."""
    from runner.grid import default_grid_axes_xyz, grid_pages

    files = []
    for sweep, rows in df.groupby("sweep", sort=True, dropna=False):
        columns, row_axis, pages = default_grid_axes_xyz(rows)
        legend = ", ".join(f"{k}: {v}" for k, v in (("columns", columns), ("rows", row_axis), ("pages", pages)) if v)
        for n, (title, image) in enumerate(grid_pages(rows, columns, row_axis, pages)):
            path = out / f"grid_{_slug(sweep)}_{n:02d}.png"
            image.save(path)
            files.append((f"{sweep or 'single runs'}: {legend or 'one image'}{' — ' + title if title else ''}", path))
    return files


def schedule_axes(schedule, y: str = "sigma"):
    """(x, y) of one schedule.csv frame: x = the fraction of steps done, step / (n - 1), so that schedules of any
    length share an axis; y = its `sigma` or `log_snr` column (log-SNR puts VP and flow schedules on one scale)."""
    if y not in ("sigma", "log_snr"):
        raise ValueError(f"y={y!r} is not allowed: 'sigma' or 'log_snr'")
    return schedule["step"] / max(1, len(schedule) - 1), schedule[y]


def schedule_plot(df, out: Path, log_snr: bool = False) -> Path | None:
    """Sigma against step, or with `log_snr` log-SNR against the fraction of steps done (schedule_axes), one line
    per scheduler and steps value (from each job's schedule.csv)."""
    import pandas as pd

    curves = {}
    swept_shift = "shift" in df and df["shift"].nunique() > 1  # flow models: the shift reshapes the schedule
    keys = ["scheduler", "steps"] + ["shift"] * swept_shift
    for key, rows in df[df["status"] == "ok"].groupby(keys, sort=True, dropna=False):
        path = Path(rows["job_dir"].iloc[0]) / SCHEDULE_FILE
        if path.is_file():
            shift = f", shift {key[2]:g}" if swept_shift and pd.notna(key[2]) else ""
            curves[f"{key[0]}, {key[1]} steps{shift}"] = pd.read_csv(path)
    if log_snr:  # schedules written before log_snr have none
        curves = {label: schedule for label, schedule in curves.items() if "log_snr" in schedule}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ("-", "--", ":", "-.")  # schedulers that share a schedule (ddim and euler) stay visible
    for n, (label, schedule) in enumerate(curves.items()):
        x, y = schedule_axes(schedule, "log_snr") if log_snr else (schedule["step"], schedule["sigma"])
        ax.plot(x, y, marker=".", linestyle=styles[n % len(styles)], label=label)
    if log_snr:
        ax.set(xlabel="fraction of steps done", ylabel="log SNR", title="log-SNR schedules")
    else:
        ax.set(xlabel="step", ylabel="sigma", yscale="log", title="Sigma schedules")
    ax.legend(fontsize="small", ncol=2)
    return _save_figure(fig, out / ("log_snr_schedule.png" if log_snr else "sigma_schedule.png"))


def bar_chart(df, metric: str, title: str, ylabel: str, path: Path, bars: str = "steps") -> Path | None:
    """`metric` (mean over images) by scheduler, one bar per value of `bars` (steps, guidance ...)."""
    from runner.results import pivot

    if metric not in df or df[metric].isna().all():
        return None
    table = pivot(df, metric, "scheduler", bars)
    if table.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    table.plot.bar(ax=ax, rot=0)
    ax.set(xlabel="scheduler", ylabel=ylabel, title=title)
    ax.legend(title=bars, fontsize="small")
    return _save_figure(fig, path)


def image_metric_charts(df, out: Path) -> list[tuple[Path | None, str]]:
    """The model's per-image metric (runner.metrics) by scheduler, one bar per guidance value where guidance was
    swept (it moves prompt adherence most), else per steps value."""

    bars = "guidance" if "guidance" in df and df["guidance"].nunique() > 1 else "steps"
    return [(bar_chart(df, c, c.replace("_", " ").capitalize(), c, out / f"{c}.png", bars),
             f"mean {c} per image by scheduler and {bars} (higher is better)") for c in QUALITY_COLUMNS if c in df]


def convergence_plot(df, out: Path) -> Path | None:
    """PSNR to the reference against steps, one line per scheduler: who gets closest in the fewest steps."""
    from runner.results import pivot

    if "psnr_to_ref" not in df:
        return None
    finite = df[df["psnr_to_ref"].apply(lambda v: v is not None and v == v and v != float("inf"))]
    if finite.empty:
        return None
    table = pivot(finite, "psnr_to_ref", "steps", "scheduler")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    table.plot(ax=ax, marker="o")
    ax.set(xlabel="steps", ylabel="PSNR to reference (dB)", title="Convergence to the reference image")
    ax.legend(title="scheduler", fontsize="small", ncol=2)
    return _save_figure(fig, out / "convergence.png")


def table_frame(df):
    """The table's columns, in REPORT_COLUMNS order, with peak memory where recorded."""
    shown = df.assign(job=[Path(p).name for p in df["job_dir"]],
                      image=[Path(p).name if isinstance(p, str) and p else "" for p in df["image_path"]])
    columns = [c for c in REPORT_COLUMNS if c in shown.columns] + peak_memory_columns(df)
    return shown[columns]


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def table_html(df) -> str:
    frame = table_frame(df)
    head = "".join(f"<th onclick='sortBy(this)'>{html.escape(c)}</th>" for c in frame.columns)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                     for row in frame.itertuples(index=False))
    return f"<table id='results'><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(path.name)}'>"
            f"<figcaption>{html.escape(caption)} <small>({html.escape(path.name)})</small></figcaption></figure>")


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }}
img {{ max-width: 100%; border: 1px solid #ccc; image-rendering: pixelated; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: left; white-space: nowrap; }}
td {{ max-width: 20em; overflow: hidden; text-overflow: ellipsis; }}
th {{ background: #eee; cursor: pointer; position: sticky; top: 0; }}
th.asc::after {{ content: " ▲"; }} th.desc::after {{ content: " ▼"; }}
</style>
<script>
// Click a header to sort by that column (numbers as numbers); click again to reverse.
function sortBy(th) {{
  const table = th.closest('table'), index = [...th.parentNode.children].indexOf(th);
  const ascending = !th.classList.contains('asc');
  table.querySelectorAll('th').forEach(h => h.classList.remove('asc', 'desc'));
  th.classList.add(ascending ? 'asc' : 'desc');
  const value = row => {{ const t = row.children[index].textContent, n = parseFloat(t);
                         return isNaN(n) || t.trim() === '' ? t : n; }};
  const rows = [...table.tBodies[0].rows].sort((a, b) => {{
    const x = value(a), y = value(b);
    const order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
    return ascending ? order : -order; }});
  rows.forEach(r => table.tBodies[0].appendChild(r));
}}
</script></head><body>
<h1>{title}</h1>
<p>{summary}</p>
{sections}
</body></html>
"""


def earlier_pictures(out: Path) -> list[str]:
    """The PNGs an earlier report into `out` wrote, as its manifest names them (none without a manifest)."""
    manifest = out / MANIFEST
    names = manifest.read_text().splitlines() if manifest.is_file() else []
    return [n for n in names if n.endswith(".png") and n == Path(n).name]  # bare file names: never outside `out`


def write_report(df, out: Path, reference=None, reference_scheduler: str | None = None) -> Path:
    """Write report.html and its PNGs into `out`, and the manifest naming those PNGs; returns the HTML's path."""
    from runner.convergence import add_convergence

    out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_pictures(out)
    df = add_convergence(df, reference=reference, scheduler=reference_scheduler)
    sections = []
    grids = grid_files(df, out)
    if grids:
        sections.append("<h2>Image grids</h2>" + "".join(_img(path, caption) for caption, path in grids))
    charts = [(schedule_plot(df, out), "sigma against step, one line per scheduler and steps value"),
              (schedule_plot(df, out, log_snr=True), "log-SNR against the fraction of steps done: VP and flow "
               "schedules on one axis (-inf, pure noise, is off the chart)"),
              (convergence_plot(df, out), "PSNR of each image to its reference (higher is closer)"),
              (bar_chart(df, "time_per_image_s", "Time per image", "seconds", out / "time_per_image.png"),
               "mean seconds per image"),
              (bar_chart(df, "time_per_step_s", "Time per step", "seconds", out / "time_per_step.png"),
               "mean denoising seconds per step and image")]
    charts += image_metric_charts(df, out)
    charts += [(bar_chart(df, c, c, c, out / f"{_slug(c)}.png"), c) for c in peak_memory_columns(df)]
    charts = [(path, caption) for path, caption in charts if path is not None]
    if charts:
        sections.append("<h2>Charts</h2>" + "".join(_img(path, caption) for path, caption in charts))
    sections.append("<h2>Results</h2><p>Click a column header to sort.</p>" + table_html(df))
    sweeps = sorted(s for s in df["sweep"].unique() if s)
    ok = int((df["status"] == "ok").sum())
    references = sorted({f"{s} at {n} steps" for s, n in zip(df.get("ref_scheduler", []), df.get("ref_steps", []))
                         if isinstance(s, str)})
    summary = (f"{len(df)} image(s), {ok} ok, {len(df) - ok} failed; sweeps: {', '.join(sweeps) or '(single runs)'}; "
               f"reference: {', '.join(references) or 'none'}")
    page = PAGE.format(title=html.escape(f"Sweep report: {', '.join(sweeps) or 'runs'}"), summary=html.escape(summary),
                       sections="\n".join(sections))
    path = out / "report.html"
    atomic_write_bytes(path, page.encode())
    pictures = [p.name for _, p in grids] + [p.name for p, _ in charts]
    atomic_write_bytes(out / MANIFEST, "".join(f"{name}\n" for name in pictures).encode())
    # Only pictures of an earlier report (grids with other axes ...): `--out` can name a dir of the user's own files.
    for name in set(earlier) - set(pictures):
        (out / name).unlink(missing_ok=True)
    return path


def main(argv=None) -> int:
    from runner import results

    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dirs, job dirs or results trees")
    parser.add_argument("--out", type=Path, help="where report.html goes (default: <first PATH>/report)")
    parser.add_argument("--reference", type=Path, help="a separate reference run (default: within the sweep)")
    parser.add_argument("--reference-scheduler", help="the reference scheduler (default: the one with most steps)")
    args = parser.parse_args(argv)
    for path in args.paths + ([args.reference] if args.reference else []):
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
