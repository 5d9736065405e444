"""The report's interactive charts (Plotly: hover shows values, a legend click hides a line or a bar group).

A chart is a function that takes the results DataFrame (one row per image, convergence columns added) and returns
a `plotly.graph_objects.Figure`, or None when the rows hold nothing for it. CHARTS lists them in page order; to add
one (the NFE-quality frontier, say), write such a function and put it in CHARTS: `frontier_chart` is its place.
Categories (schedulers ...) come in the order the sweep typed them.
"""

from pathlib import Path

from runner.columns import QUALITY_COLUMNS
from runner.grid import ordered_values
from runner.jobdir import SCHEDULE_FILE

TEMPLATE = "plotly_white"
DASHES = ("solid", "dash", "dot", "dashdot")  # schedulers that share a schedule (ddim and euler) stay visible


def ok_rows(df):
    return df[df["status"] == "ok"] if "status" in df else df


def figure(title: str, x_title: str, y_title: str, **layout):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, template=TEMPLATE, xaxis_title=x_title, yaxis_title=y_title, height=380,
                      margin=dict(l=60, r=20, t=50, b=50), legend=dict(groupclick="togglegroup"), **layout)
    return fig


def bar_chart(df, metric: str, title: str, y_title: str, bars: str = "steps"):
    """`metric` (mean over ok images, hover shows it and the count) by scheduler, one bar per value of `bars`."""
    rows = ok_rows(df)
    if metric not in rows or rows[metric].isna().all() or bars not in rows:
        return None
    fig = figure(title, "scheduler", y_title, barmode="group")
    schedulers = ordered_values(rows, "scheduler")
    for value in ordered_values(rows, bars):
        selected = rows[rows[bars] == value].groupby("scheduler")[metric].agg(["mean", "count"])
        selected = selected.reindex([s for s in schedulers if s in selected.index])
        fig.add_bar(x=list(selected.index), y=list(selected["mean"]), name=f"{bars} {value}",
                    customdata=list(selected["count"]),
                    hovertemplate=f"%{{x}}, {bars} {value}: %{{y:.4g}} (%{{customdata}} image(s))<extra></extra>")
    fig.update_xaxes(categoryorder="array", categoryarray=schedulers)
    return fig


def quality_bars(df) -> str:
    """Quality is charted by guidance where guidance was swept (it moves prompt adherence most), else by steps."""
    return "guidance" if "guidance" in df and df["guidance"].nunique() > 1 else "steps"


def quality_chart(metric: str):
    def chart(df):
        return bar_chart(df, metric, f"{metric} by scheduler and {quality_bars(df)} (higher is better)",
                         f"mean {metric}", quality_bars(df))
    chart.__name__ = f"{metric}_chart"
    return chart


def time_per_image_chart(df):
    return bar_chart(df, "time_per_image_s", "Time per image (lower is better)", "seconds")


def time_per_step_chart(df):
    return bar_chart(df, "time_per_step_s", "Denoising time per step and image (lower is better)", "seconds")


def memory_chart(df):
    """Every measured peak-memory column, by scheduler (mean over the sweep's jobs)."""
    rows = ok_rows(df)
    columns = [c for c in rows.columns if "peak" in c and "mem" in c and rows[c].notna().any()]
    if not columns:
        return None
    fig = figure("Peak memory", "scheduler", "MB", barmode="group")
    schedulers = ordered_values(rows, "scheduler")
    for column in columns:
        means = rows.groupby("scheduler")[column].mean().reindex(schedulers)
        fig.add_bar(x=schedulers, y=list(means), name=column,
                    hovertemplate=f"%{{x}}: {column} %{{y:.1f}} MB<extra></extra>")
    return fig


def convergence_chart(df):
    """PSNR to the reference against steps, one line per scheduler: who gets closest in the fewest steps."""
    rows = ok_rows(df)
    if "psnr_to_ref" not in rows:
        return None
    finite = rows[rows["psnr_to_ref"].apply(lambda v: v is not None and v == v and v != float("inf"))]
    if finite.empty:
        return None
    fig = figure("Convergence to the reference image (higher is closer)", "steps", "PSNR to reference (dB)")
    for scheduler in ordered_values(finite, "scheduler"):
        means = finite[finite["scheduler"] == scheduler].groupby("steps")["psnr_to_ref"].mean()
        fig.add_scatter(x=list(means.index), y=list(means), name=str(scheduler), mode="lines+markers",
                        hovertemplate=f"{scheduler}, %{{x}} steps: %{{y:.2f}} dB<extra></extra>")
    return fig


def schedules(df) -> dict[str, "pandas.DataFrame"]:
    """{"<scheduler>, <steps> steps": the schedule of its first ok job} from each job's schedule.csv."""
    import pandas as pd

    rows = ok_rows(df)
    curves = {}
    for scheduler in ordered_values(rows, "scheduler"):
        for steps in ordered_values(rows[rows["scheduler"] == scheduler], "steps"):
            job = rows[(rows["scheduler"] == scheduler) & (rows["steps"] == steps)]["job_dir"].iloc[0]
            path = Path(job) / SCHEDULE_FILE
            if path.is_file():
                curves[f"{scheduler}, {steps} steps"] = pd.read_csv(path).assign(steps=steps)
    return curves


def sigma_schedule_chart(df):
    """Sigma against step (log scale), one line per scheduler and steps value; a button switches to log-SNR
    against the fraction of steps done, where the schedules recorded it (schedulers of different step counts
    then share one x axis)."""
    curves = schedules(df)
    if not curves:
        return None
    fig = figure("Sigma schedules", "step", "sigma")
    with_snr = all("log_snr" in c for c in curves.values())
    for n, (label, curve) in enumerate(curves.items()):
        line = dict(dash=DASHES[n % len(DASHES)])
        fig.add_scatter(x=list(curve["step"]), y=list(curve["sigma"]), name=label, mode="lines+markers", line=line,
                        legendgroup=label, hovertemplate=f"{label}<br>step %{{x}}: sigma %{{y:.4g}}<extra></extra>")
        if with_snr:
            fraction = curve["step"] / curve["steps"]
            fig.add_scatter(x=list(fraction), y=list(curve["log_snr"]), name=label, mode="lines+markers", line=line,
                            legendgroup=label, visible=False, showlegend=True,
                            hovertemplate=f"{label}<br>%{{x:.2f}} of steps: log-SNR %{{y:.3f}}<extra></extra>")
    fig.update_yaxes(type="log")
    if with_snr:
        n = len(curves)
        sigma_view = [True, False] * n
        snr_view = [False, True] * n
        fig.update_layout(updatemenus=[dict(type="buttons", direction="right", x=1, y=1.18, xanchor="right", buttons=[
            dict(label="sigma vs step", method="update",
                 args=[{"visible": sigma_view}, {"xaxis.title.text": "step", "yaxis.title.text": "sigma",
                                                  "yaxis.type": "log"}]),
            dict(label="log-SNR vs fraction of steps", method="update",
                 args=[{"visible": snr_view}, {"xaxis.title.text": "fraction of steps", "yaxis.title.text": "log-SNR",
                                                "yaxis.type": "linear"}])])])
        fig.update_layout(margin=dict(t=80))
    return fig


def frontier_chart(df):
    """The NFE-quality frontier: its place is kept here for the developer who adds it (return a Figure)."""
    return None


CHARTS = [sigma_schedule_chart, convergence_chart, *[quality_chart(c) for c in QUALITY_COLUMNS], frontier_chart,
          time_per_image_chart, time_per_step_chart, memory_chart]


def charts(df) -> list[tuple[str, str]]:
    """(name, Plotly figure JSON) of every chart in CHARTS that these rows can draw."""
    drawn = []
    for chart in CHARTS:
        fig = chart(df)
        if fig is not None:
            drawn.append((chart.__name__, fig.to_json()))
    return drawn
