"""A saved W&B workspace for one sweep, built in code with `wandb-workspaces` (the `workspaces` extra).

`python -m runner.wandb_workspace SWEEP [--entity E] [--project P] [--name N] [--dry-run]` makes a workspace view
showing the sweep's job runs (its W&B group, runner.loggers.wandb.group_name), grouped by `scheduler.name`, with:
the sigma schedules (x `schedule/step`, y `schedule/sigma`, log y), a media panel on `images`, time and quality
bar charts, and a parallel-coordinates panel over steps, guidance, time and quality. Online it saves the view and
prints its URL; offline (or with --dry-run) it prints what it would create and saves nothing.
"""

import argparse
import sys
from pathlib import Path

from runner.columns import QUALITY_COLUMNS
from runner.loggers.wandb import group_name, resolve_mode

GROUP_BY = "scheduler.name"
TIME_METRICS = ("time_denoise_s", "images_per_s")  # job summaries (runner.loggers.wandb.log_job)


def sweep_settings(sweep_dir: Path) -> dict:
    """The `wandb` options the sweep's jobs ran with (from the first job's composed config)."""
    from omegaconf import OmegaConf

    for config in sorted(Path(sweep_dir).glob("*/.hydra/config.yaml")):
        cfg = OmegaConf.load(config)
        if "wandb" in cfg:
            return OmegaConf.to_container(cfg.wandb, resolve=False)
    return {}


def quality_metrics(df) -> list[str]:
    """The quality metrics the sweep's images have (prompt_adherence on digit models, clip_score on hub SD)."""
    return [c for c in QUALITY_COLUMNS if c in df and df[c].notna().any()]


def build_workspace(entity: str, project: str, group: str, quality: list[str], n_runs: int, name: str = ""):
    """The workspace object (validated by wandb-workspaces' own pydantic models as it is built)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    by_scheduler = wr.Config(GROUP_BY)
    time_bars = [wr.BarPlot(title=f"{m} by {GROUP_BY}", metrics=[m], groupby=by_scheduler, groupby_aggfunc="mean",
                            orientation="v") for m in TIME_METRICS]
    quality_bars = [wr.BarPlot(title=f"{m} by {GROUP_BY} (higher is better)", metrics=[m], groupby=by_scheduler,
                               groupby_aggfunc="mean", orientation="v") for m in quality]
    axes = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k), display_name=k) for k in ("steps", "guidance")]
    axes += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(m), display_name=m)
             for m in ("time_denoise_s", *quality)]
    sections = [
        ws.Section(name="Sigma schedules", is_open=True, panels=[
            wr.LinePlot(title="sigma by step", x="schedule/step", y=["schedule/sigma"], log_y=True, title_x="step",
                        title_y="sigma")]),
        ws.Section(name="Images", is_open=True, panels=[wr.MediaBrowser(title="images", media_keys=["images"])]),
        ws.Section(name="Time", is_open=True, panels=time_bars),
        ws.Section(name="Quality", is_open=bool(quality), panels=quality_bars),
        ws.Section(name="Steps, guidance, time and quality", is_open=True, panels=[
            wr.ParallelCoordinatesPlot(title="steps, guidance, time, quality", columns=axes)]),
    ]
    return ws.Workspace(
        entity=entity, project=project, name=name or f"sweep {group}", sections=sections,
        settings=ws.WorkspaceSettings(max_runs=max(10, n_runs)),
        runset_settings=ws.RunsetSettings(filters=ws.And(ws.Metric("Group") == group, ws.Metric("JobType") == "job"),
                                          groupby=[ws.Config(GROUP_BY)]))


def describe(workspace) -> str:
    """What the workspace holds, in lines a person reads."""
    lines = [f"workspace {workspace.name!r} in {workspace.entity}/{workspace.project}",
             f"  runs: {workspace.runset_settings.filters}",
             f"  grouped by: {', '.join(g.name for g in workspace.runset_settings.groupby)}"]
    for section in workspace.sections:
        lines.append(f"  section {section.name!r}:")
        for panel in section.panels:
            fields = {k: getattr(panel, k, None) for k in ("x", "y", "log_y", "metrics", "groupby", "media_keys")}
            if getattr(panel, "columns", None):
                fields["columns"] = [c.display_name for c in panel.columns]
            shown = ", ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, [], ()))
            lines.append(f"    {type(panel).__name__} {panel.title!r}: {shown}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from runner import results

    parser = argparse.ArgumentParser(prog="python -m runner.wandb_workspace", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep dir (its name is the W&B group of its runs)")
    parser.add_argument("--entity", help="W&B entity (default: the sweep's wandb.entity, else your default entity)")
    parser.add_argument("--project", help="W&B project (default: the sweep's wandb.project)")
    parser.add_argument("--name", default="", help="the workspace's name (default: sweep <group>)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be created; save nothing")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"error: sweep={str(args.sweep)!r} is not allowed: an existing sweep dir", file=sys.stderr)
        return 2
    df = results.load(args.sweep)
    if df.empty:
        print(f"error: sweep={str(args.sweep)!r} is not allowed: a sweep dir with result rows", file=sys.stderr)
        return 2
    settings = sweep_settings(args.sweep)
    online = not args.dry_run and resolve_mode(settings.get("mode") or "auto") == "online"
    entity = args.entity or settings.get("entity")
    if online and not entity:
        import wandb

        entity = wandb.Api().default_entity
    project = args.project or settings.get("project") or "diffusion-runner"
    group = group_name({"sweep_dir": str(args.sweep.resolve()), "job_dir": ""})
    workspace = build_workspace(entity or "<your entity>", project, group, quality_metrics(df),
                                df["job_dir"].nunique(), args.name)
    if not online:
        print("W&B is offline (or --dry-run): nothing saved. It would create:")
        print(describe(workspace))
        return 0
    workspace.save()
    print(f"saved: {workspace.url}")
    return 0
