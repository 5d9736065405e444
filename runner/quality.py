"""Quality against cost, as sampler papers show it: a figure (quality against NFE or time, a line per sampler, error
bars, the frontier marked) and a paper-style table (rows samplers, columns NFE, cells "mean ± CI half-width").

    import runner.results, runner.quality
    df = runner.results.load("results/sweeps/<time>")
    runner.quality.frontier_figure(df, "psnr_to_ref").show()
    runner.quality.paper_table(df, "prompt_adherence")

Per-image metrics get runner.results.summary's bootstrap 95% CI over the cell's images. KID (per cell) gets
± 2 standard errors, its std over half-size subsets / sqrt(2); FID, biased at small n, gets no interval. Cells
whose intervals overlap are never called different: the table marks every cell that is not different from its
column's best, not one winner.
"""

import html
import math

from runner.columns import CONTENT_AXES, DISTRIBUTION_COLUMNS
from runner.results import cell_axes, different, frontier, ok_rows, summary

# Quality columns the report shows when they hold values, and whether higher is better.
HIGHER_IS_BETTER = {"prompt_adherence": True, "clip_score": True, "psnr_to_ref": True, "ssim_to_ref": True,
                    "latent_mse_to_ref": False, "kid_digits": False, "fid_digits": False}
DISTANCE_COLUMNS = ("psnr_to_ref", "ssim_to_ref", "latent_mse_to_ref")  # to one reference image: not for stochastic
REPORTED = ("prompt_adherence", "clip_score", "psnr_to_ref", "kid_digits", "fid_digits")  # the report's, in order


def line_axes(df) -> list[str]:
    """The cell axes that name a line (all but steps): a line per scheduler, or per scheduler and guidance ..."""
    return [a for a in cell_axes(df) if a != "steps"] or ["scheduler"]


def label(values: dict) -> str:
    return " ".join(str(v) if k == "scheduler" else f"{k}={v}" for k, v in values.items())


def stochastic_lines(df) -> set:
    """Labels of the lines whose rows the convergence step marked `stochastic`."""
    if "stochastic" not in df:
        return set()
    rows = ok_rows(df)
    marked = rows[rows["stochastic"].fillna(False).astype(bool)]
    return {label(dict(zip(line_axes(df), key if isinstance(key, tuple) else (key,))))
            for key, _ in marked.groupby(line_axes(df), sort=True)} if len(marked) else set()


def cell_table(df, quality: str, cost: str = "nfe", n_boot: int = 2000, seed: int = 0):
    """Per cell: its line's label, mean `cost`, and the `quality` mean, ci_low, ci_high and n."""
    import pandas as pd

    by = cell_axes(df)
    rows = ok_rows(df)
    if quality in DISTRIBUTION_COLUMNS:  # one value per cell, the same on each of its rows
        agg = dict(mean=(quality, "first"), n=(quality, "size"))
        if quality == "kid_digits" and "kid_digits_std" in rows:
            agg["std"] = ("kid_digits_std", "first")
        table = rows.dropna(subset=[quality]).groupby(by, sort=True, dropna=False).agg(**agg).reset_index()
        # KID's variance falls as 1/n: the std over half-size subsets, / sqrt(2), estimates the whole cell's
        spread = 2 * table["std"] / math.sqrt(2) if "std" in table else float("nan")
        table["ci_low"], table["ci_high"] = table["mean"] - spread, table["mean"] + spread
    else:
        table = summary(rows, by=by, metrics=[quality], n_boot=n_boot, seed=seed).drop(columns="metric")
    costs = rows.assign(**{cost: pd.to_numeric(rows[cost], errors="coerce")}).groupby(
        by, sort=True, dropna=False)[cost].mean().rename("cost").reset_index()
    table = table.merge(costs, on=by, how="left")
    table["line"] = [label({a: r[a] for a in line_axes(df)}) for r in table.to_dict("records")]
    return table.dropna(subset=["mean", "cost"]).sort_values(["line", "cost"], kind="stable").reset_index(drop=True)


def frontier_figure(df, quality: str, cost: str = "nfe", higher_is_better: bool | None = None):
    """A Plotly figure: `quality` against `cost`, a line per sampler with its cells' CIs as error bars, and the
    frontier (runner.results.frontier: the cells no other cell beats on both) as a black step line of rings.
    Stochastic samplers are dashed where the quality is a distance to one reference image."""
    import plotly.graph_objects as go

    higher = HIGHER_IS_BETTER.get(quality, True) if higher_is_better is None else higher_is_better
    table = cell_table(df, quality, cost)
    stochastic = stochastic_lines(df) if quality in DISTANCE_COLUMNS else set()
    fig = go.Figure()
    for line, cells in table.groupby("line", sort=True):
        fig.add_trace(go.Scatter(
            x=cells["cost"], y=cells["mean"], mode="lines+markers",
            name=f"{line} (stochastic)" if line in stochastic else line,
            line=dict(dash="dash" if line in stochastic else "solid"),
            error_y=dict(type="data", symmetric=False, array=cells["ci_high"] - cells["mean"],
                         arrayminus=cells["mean"] - cells["ci_low"]),
            customdata=cells["n"], hovertemplate=f"%{{x:.3g}} {cost}<br>{quality} %{{y:.4g}}<br>n=%{{customdata}}"))
    front = frontier(df, quality, cost, higher, by=cell_axes(df))  # a per-cell metric's mean is its value
    if len(front):
        fig.add_trace(go.Scatter(x=front[cost], y=front[quality], mode="lines+markers", name="frontier",
                                 line=dict(color="black", shape="hv" if higher else "vh", width=1),
                                 marker=dict(symbol="circle-open", size=14, color="black")))
    direction = "higher is better" if higher else "lower is better"
    fig.update_layout(title=f"{quality} against {cost} ({direction}; bars: 95% CI)", xaxis_title=cost,
                      yaxis_title=quality, template="plotly_white", legend_title="sampler")
    return fig


def table_cells(df, quality: str, cost: str = "nfe"):
    """cell_table with the table's column (the cost, an integer where it is one, as NFE is) and, for distances to
    a reference image, stochastic samplers labelled so."""
    table = cell_table(df, quality, cost)
    stochastic = stochastic_lines(df) if quality in DISTANCE_COLUMNS else set()
    table["line"] = [f"{line} (stochastic)" if line in stochastic else line for line in table["line"]]
    table["column"] = [round(c) if abs(c - round(c)) < 1e-9 else round(c, 3) for c in table["cost"]]
    table["text"] = [format_cell(r) for r in table.to_dict("records")]
    return table


def paper_table(df, quality: str, cost: str = "nfe"):
    """Rows samplers, columns `cost` values (NFE), cells "mean ± CI half-width" (the half-width of the 95% CI;
    "mean" alone without an interval), as a DataFrame of strings."""
    out = table_cells(df, quality, cost).pivot_table(index="line", columns="column", values="text",
                                                     aggfunc="first").fillna("")
    out.index.name, out.columns.name = "sampler", cost
    return out


def format_cell(row: dict) -> str:
    """"mean ± half-width", both to the half-width's second significant digit ("16.34 ± 0.47", "951 ± 610")."""
    half = (row["ci_high"] - row["ci_low"]) / 2
    if half != half:  # NaN: no interval
        return f"{row['mean']:.4g}"
    decimals = max(0, 1 - math.floor(math.log10(half))) if half > 0 else 4
    return f"{row['mean']:.{decimals}f} ± {half:.{decimals}f}"


def paper_table_html(df, quality: str, cost: str = "nfe", higher_is_better: bool | None = None) -> str:
    """paper_table as HTML: in each column, every cell not different from the column's best (CIs overlap) is bold."""
    higher = HIGHER_IS_BETTER.get(quality, True) if higher_is_better is None else higher_is_better
    table = table_cells(df, quality, cost)
    texts = paper_table(df, quality, cost)
    tied = set()
    for column, cells in table.groupby("column"):
        best = cells.loc[cells["mean"].idxmax() if higher else cells["mean"].idxmin()]
        tied |= {(r["line"], column) for r in cells.to_dict("records") if not different(r, best)}

    def cell(line, column, text):
        return f"<td><b>{html.escape(text)}</b></td>" if (line, column) in tied else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in texts.columns)
    body = "".join(f"<tr><th>{html.escape(str(line))}</th>"
                   + "".join(cell(line, c, v) for c, v in zip(texts.columns, values)) + "</tr>"
                   for line, values in zip(texts.index, texts.to_numpy()))
    return (f"<table class='paper'><thead><tr><th>sampler \\ {html.escape(cost)}</th>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def shown_metrics(df) -> list[str]:
    """The REPORTED quality columns that hold at least one value."""
    import pandas as pd

    rows = ok_rows(df)
    return [c for c in REPORTED if c in rows and pd.to_numeric(rows[c], errors="coerce").notna().any()]


def report_section(df, cost: str = "nfe") -> str:
    """The report's "Quality against cost" section: per shown metric, the figure (Plotly, its script inline once,
    so the page works offline) and the paper table; what the references and the stochastic samplers mean."""
    import pandas as pd

    if cost not in df or pd.to_numeric(df[cost], errors="coerce").isna().all():
        return ""
    parts = ["<h2>Quality against cost</h2>",
             "<p>Bars and ± are bootstrap 95% confidence intervals over each cell's images (KID: ± 2 standard errors "
             "from its std over half-size subsets). In each table column, bold marks every cell whose interval overlaps the best one's: those "
             "are not shown to differ.</p>"]
    if "ref_converged" in df and df["ref_converged"].notna().any():
        checked = df[df["ref_converged"].notna()]
        references = checked.drop_duplicates(subset=[a for a in CONTENT_AXES if a in checked])  # one per content
        parts.append(f"<p>References: converged solutions (runner.reference), {int(references['ref_converged'].sum())} "
                     f"of {len(references)} within {references['ref_tolerance_db'].iloc[0]:g} dB of their half-step "
                     f"solve.</p>")
    if "stochastic" in df and df["stochastic"].fillna(False).astype(bool).any():
        names = ", ".join(sorted(set(df[df["stochastic"].fillna(False).astype(bool)]["scheduler"])))
        parts.append(f"<p>Stochastic samplers ({html.escape(names)}, dashed) draw another valid image for the same "
                     f"seed: their distance to the reference image says little. Compare them by distribution "
                     f"(KID/FID).</p>")
    shown = shown_metrics(df)
    if shown:
        parts.append(plotly_script())
    for quality in shown:
        parts.append(frontier_figure(df, quality, cost).to_html(full_html=False, include_plotlyjs=False))
        parts.append(paper_table_html(df, quality, cost))
    return "\n".join(parts)


def plotly_script() -> str:
    """plotly.js inline, as a data: URI: the page needs no network, and the library's own link texts (its logo,
    map tiles it never loads here) are not read as links of the page."""
    import base64

    from plotly.offline import get_plotlyjs

    return f"<script src='data:text/javascript;base64,{base64.b64encode(get_plotlyjs().encode()).decode()}'></script>"
