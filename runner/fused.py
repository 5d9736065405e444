"""Fused sweeps (`hydra/launcher=fused`): sweep points that can share a UNet batch are drawn together, and every
point still runs as its own job, finding its images already drawn. A recipe:

    1. plan: check each point's config (a refused, finished or partly drawn point is left to its own job) and group
       the points whose specs agree on everything but guidance, seeds, prompts and negative prompt
    2. draw a group in batches of whole points, at most `sampling.batch_size` images each: one CPU generator and one
       guidance scale per image, each point's prompts encoded by its own state; row-wise kernels are called per
       point (SplitRows), so each image is bit-identical to its point drawn alone
    3. hand each point its images, its evaluations and its share of the batch's time (`take`, a per-process cache);
       its job (runner.draw) saves and records them as if it had drawn them

A batch that raises leaves nothing behind: its points then draw alone, in their own jobs.
"""

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

log = logging.getLogger("runner")

# What the points of one batch may differ in; every other field of their specs must be equal.
FREE_FIELDS = ("guidance", "seeds", "prompts", "negative_prompt", "progress")


def group_key(spec) -> str | None:
    """Points with the same key can share a UNet batch; None: this point always draws alone (its family cannot
    fuse it, a guidance-embedded denoiser, more images than one batch holds)."""
    from runner.families import by_name

    if not by_name(spec.family).fusable(spec):
        return None
    if (spec.model_facts or {}).get("guidance_embedded") or len(spec.prompts) * len(spec.seeds) > spec.batch_size:
        return None
    if any((spec.precision_options or {}).get(k) for k in ("channels_last", "compile", "cpu_offload")):
        return None  # memory layouts, compiled kernels, offload hooks: SplitRows does not reproduce them (not measured)
    return json.dumps({k: v for k, v in asdict(spec).items() if k not in FREE_FIELDS}, sort_keys=True, default=str)


@dataclass
class Point:
    """A sweep point the launcher planned: its checked spec and where its job will look for its images."""

    index: int  # in the launcher's job list
    spec: object
    job_dir: str
    config_hash: str
    job_num: int

    @property
    def images(self) -> int:
        return len(self.spec.prompts) * len(self.spec.seeds)

    @property
    def plan(self) -> list:
        """(prompt, seed) per image, in the order its job draws them (runner.draw)."""
        return [(prompt, seed) for prompt in self.spec.prompts for seed in self.spec.seeds]


def batches(points: list[Point]) -> list[list[Point]]:
    """Whole points, in order, packed into batches of at most `sampling.batch_size` images; batches of one point
    are dropped (the point draws alone)."""
    out, current = [], []
    for point in points:
        if current and sum(p.images for p in current) + point.images > point.spec.batch_size:
            out.append(current)
            current = []
        current.append(point)
    out.append(current)
    return [b for b in out if len(b) > 1]


def group(points: list[Point]) -> list[list[list[Point]]]:
    """The fused groups (points of one key), each as its batches; points with no key or no partner left out."""
    by_key: dict[str, list[Point]] = {}
    for point in points:
        key = group_key(point.spec)
        if key is not None:
            by_key.setdefault(key, []).append(point)
    return [b for b in (batches(members) for members in by_key.values()) if b]


@dataclass
class Predrawn:
    """One point's images drawn in a fused batch, waiting for its job."""

    images: object  # uint8 NHWC
    latents: object
    nfe: int
    forward: int
    laps: dict = field(default_factory=dict)  # the point's share of each timed span of the batch
    shared_s: float = 0.0  # the point's share of the batch's wall time
    cached: bool = True  # whether the batch found the model loaded
    group: int = 0
    batch_size: int = 0

    def charge(self, clock) -> None:
        """Add the point's share of the batch's spans and wall time to its job's clock (runner.timing.JobClock)."""
        for name, laps in self.laps.items():
            clock.timer.laps[name].extend(laps)
        clock.shared_s += self.shared_s

    def columns(self) -> dict:
        from runner.columns import FUSED_COLUMNS

        return dict(zip(FUSED_COLUMNS, (self.group, self.batch_size)))


_predrawn: dict[tuple[str, str], Predrawn] = {}


def take(job_dir, config_hash: str) -> Predrawn | None:
    """The images a fused batch drew for this job (once), or None: the job draws them itself."""
    return _predrawn.pop((str(Path(job_dir).resolve()), config_hash), None)


def unfused_columns() -> dict:
    from runner.columns import FUSED_COLUMNS

    return dict.fromkeys(FUSED_COLUMNS)


def draw_batch(points: list[Point], group_id: int, bit_identical: bool = True) -> bool:
    """Draw one batch of whole points and leave each point's images for its job; False (nothing left) where the
    drawing raised, so that its points draw alone. `bit_identical=False` (the bench's measure of what bit identity
    costs) leaves SplitRows out: an image then differs from its point drawn alone in its last bits, which some
    samplers amplify over the steps (README, Performance)."""
    from runner.exits import exit_in_disguise
    from runner.faults import inject_fault

    try:
        for point in points:
            inject_fault(point.job_num, "fused")
        _predrawn.update(_draw(points, group_id, bit_identical))
        return True
    except Exception as err:
        if (real_exit := exit_in_disguise(err)) is not None:
            raise real_exit from None
        from runner.draw import free_memory

        log.warning(f"fused batch of group {group_id} failed ({type(err).__name__}: {err}); its "
                    f"{len(points)} point(s) draw alone")
        free_memory()
        return False


def _draw(points: list[Point], group_id: int, bit_identical: bool) -> dict:
    import time
    from contextlib import nullcontext

    import torch

    from runner.draw import load_and_warm_up
    from runner.families import by_name
    from runner.sampling import Tally
    from runner.timing import Timer

    spec, family = points[0].spec, by_name(points[0].spec.family)
    start, timer = time.perf_counter(), Timer(spec.device)
    prompts = [prompt for p in points for prompt, _ in p.plan]
    guidance = tuple(p.spec.guidance for p in points for _ in p.plan)
    batch_spec = replace(spec, guidance=guidance)
    components, cached, scheduler, _ = load_and_warm_up(batch_spec, prompts, timer)
    # each point's prompts and negative prompt encoded by its own state, as its own job would (outside SplitRows)
    state = family.fuse([family.prepare(components, p.spec, timer) for p in points],
                        [[prompt for prompt, _ in p.plan] for p in points])
    generators = [torch.Generator("cpu").manual_seed(seed) for p in points for _, seed in p.plan]
    tally = Tally()
    cfg = [family.runs_cfg(components, p.spec) for p in points]
    units = row_units(points, cfg, family.runs_cfg(components, batch_spec))
    split = split_rows(units).over(components.denoiser, components.vae) if bit_identical else nullcontext()
    with timer("sample"), split:
        images, latents = family.sample(components, scheduler, batch_spec, prompts, generators, state, timer, tally)
    wall, total, out, first = time.perf_counter() - start, len(prompts), {}, 0
    for point, point_cfg in zip(points, cfg):
        share, rows = point.images / total, slice(first, first + point.images)
        out[(str(Path(point.job_dir).resolve()), point.config_hash)] = Predrawn(
            images=images[rows], latents=latents[rows] if latents is not None else None, nfe=tally.nfe,
            forward=tally.nfe * (2 if point_cfg else 1), shared_s=wall * share, cached=cached, group=group_id,
            batch_size=total, laps={name: [lap * share for lap in laps] for name, laps in timer.laps.items()})
        first += point.images
    log.info(f"fused group {group_id}: {total} image(s) of {len(points)} point(s) in one batch, {wall:.2f} s")
    return out


def row_units(points: list[Point], cfg: list[bool], batch_cfg: bool) -> dict[int, list[list[int]]]:
    """{rows of a call: each point's rows, in the order its own batch holds them}. The denoiser's batch is
    [uncond rows; cond rows] under classifier-free guidance (a point without guidance uses only its cond rows);
    the VAE's is one row per image."""
    total, first, images, denoiser = sum(p.images for p in points), 0, [], []
    for point, point_cfg in zip(points, cfg):
        own = list(range(first, first + point.images))
        images.append(own)
        if batch_cfg:
            denoiser.append(([*own] if point_cfg else []) + [total + i for i in own])
        first += point.images
    return {total: images, 2 * total: denoiser} if batch_cfg else {total: images}


def split_rows(units: dict[int, list[list[int]]]):
    """For a fused batch's sampling: `units` maps a call's row count to each point's rows, in the order its own batch
    holds them (row_units). `split_rows(units).over(denoiser, vae)` runs their linear, convolution and group-norm
    layers through it while the batch draws."""
    global _SplitRows
    if _SplitRows is None:
        _SplitRows = _split_rows_class()
    return _SplitRows(units)


_SplitRows = None
# A linear layer over at least this many rows gives each row the same bits whatever M (measured: M >= 12 on 2 threads)
LINEAR_ROWS_ALIKE = 16


def _split_rows_class():
    from contextlib import contextmanager

    import torch
    import torch.nn.functional as F

    class SplitRows:
        """Inside a fused batch, the row-wise kernels whose arithmetic depends on the batch are run on each point's
        rows as its own job runs them. Measured on CPU (MKL, oneDNN): a linear layer's rows differ when M < 12 or M
        is not a multiple of 4 (the time embeddings: a row or two per image), so small ones run per point, stacked
        in one baddbmm (which gives each point addmm's bits); a convolution of one image runs the native kernel, of
        several oneDNN; a group norm of channels-last input (after attention) reduces in another order for each
        batch size, while a one-image view of it is read as contiguous. Attention, contiguous norms and linear
        layers over tokens give each row the same bits at any batch size, so they stay batched. Splitting never
        changes what is computed: these ops treat rows apart."""

        def __init__(self, units: dict[int, list[list[int]]]):
            self.units, self.backends = units, {}

        @contextmanager
        def over(self, *roots):
            """The plain nn.Linear, nn.Conv2d and nn.GroupNorm layers of `roots` call through this while inside
            (their own forward: anything else that wraps a layer, a subclass, a hook's forward, is left alone)."""
            layers = {torch.nn.Linear: lambda m: (F.linear, m.weight, m.bias),
                      torch.nn.Conv2d: lambda m: (F.conv2d, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups),
                      torch.nn.GroupNorm: lambda m: (F.group_norm, m.num_groups, m.weight, m.bias, m.eps)}
            patched = []
            for root in (r for r in roots if r is not None):
                for module in root.modules():
                    kind = type(module)
                    if (kind not in layers or "forward" in module.__dict__
                            or getattr(module, "padding_mode", "zeros") != "zeros"):
                        continue
                    func, *params = layers[kind](module)
                    module.forward = (lambda func, params: lambda x: self(func, (x, *params), {}))(func, params)
                    patched.append(module)
            try:
                yield self
            finally:
                for module in patched:
                    del module.forward

        def __call__(self, func, args, kwargs):
            x = args[0]
            units = self.units.get(x.shape[0]) if x.ndim >= 2 else None
            if units is None or self.as_batched(func, x, units, args, kwargs):
                return func(*args, **kwargs)
            out = [None] * x.shape[0]
            for rows, y in self.calls(func, x, units, args, kwargs):
                for j, i in enumerate(rows):
                    out[i] = y[j]
            out = torch.stack(out)
            if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                out = out.contiguous(memory_format=torch.channels_last)  # the layout the batched call returns
            return out

        def as_batched(self, func, x, units, args, kwargs) -> bool:
            """Whether the batched call already runs every point's rows as its own job would (the common case: then
            nothing is split)."""
            if func is F.group_norm:
                return x.is_contiguous()
            if func is F.linear:
                return all(len(u) * (x[0].numel() // x.shape[-1]) >= LINEAR_ROWS_ALIKE for u in units)
            if any(len(u) == 1 for u in units):
                return False
            whole = self.backend(x, x.shape[0], args, kwargs)
            return whole is not None and all(self.backend(x, len(u), args, kwargs) == whole for u in units)

        def backend(self, x, rows: int, args, kwargs):
            """conv_backend of `rows` rows laid out as x's, remembered per shape."""
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            key = (rows, tuple(x.shape[1:]), x.stride()[1:], tuple(weight.shape), repr(args[3:]), repr(kwargs),
                   torch._C._get_mkldnn_enabled())
            if key not in self.backends:
                self.backends[key] = conv_backend(x[:rows], args, kwargs)
            return self.backends[key]

        def calls(self, func, x, units, args, kwargs):
            """(rows, their outputs) for every row of x, each point's rows run as its own job runs them."""
            used = {i for u in units for i in u}
            junk = [i for i in range(x.shape[0]) if i not in used]  # rows no point reads (a point without guidance
            if junk:                                                # in a guided batch: its uncond rows)
                yield junk, func(x[junk], *args[1:], **kwargs)
            singles = [u[0] for u in units if len(u) == 1]
            several = [u for u in units if len(u) > 1]
            if func is F.linear:
                tokens = x[0].numel() // x.shape[-1]
                small = [u for u in units if len(u) * tokens < LINEAR_ROWS_ALIKE]
                for size in sorted({len(u) for u in small}):
                    same = [u for u in small if len(u) == size]
                    yield from zip(same, stacked_linear(x, same, *args[1:], **kwargs))
                rest = [i for u in units if len(u) * tokens >= LINEAR_ROWS_ALIKE for i in u]
                if rest:
                    yield rest, func(x[rest], *args[1:], **kwargs)
                return
            if singles:  # one image: as its own job, a contiguous tensor
                one = x[singles].contiguous()
                if func is F.group_norm or "Slow2d" in str(conv_backend(one[:1], args, kwargs)):
                    yield singles, call_with_mkldnn(False if func is F.conv2d else None, func, one, args, kwargs)
                else:
                    for i in singles:
                        yield [i], func(x[[i]].contiguous(), *args[1:], **kwargs)
            if func is F.group_norm:
                for unit in several:  # channels-last: each batch size reduces in its own order
                    yield unit, func(x[unit], *args[1:], **kwargs)
                return
            by_backend: dict = {}
            for unit in several:
                by_backend.setdefault(self.backend(x, len(unit), args, kwargs), []).append(unit)
            for unit in by_backend.pop(None, []):  # a kernel not known here: alone
                yield unit, func(x[unit], *args[1:], **kwargs)
            for backend, same in by_backend.items():
                rows = [i for u in same for i in u]
                yield rows, call_with_mkldnn("Mkldnn" in str(backend), func, x[rows], args, kwargs)

    return SplitRows


def stacked_linear(x, units, weight, bias=None):
    """F.linear on each unit's rows, one baddbmm (or bmm) for all units of one size: each unit gets the bits of its
    own addmm (measured), in one call instead of one per point."""
    import torch

    k, n = x.shape[-1], weight.shape[0]
    rows = torch.stack([x[u].reshape(-1, k) for u in units])
    w = weight.t().expand(len(units), k, n)
    y = torch.baddbmm(bias.expand(len(units), rows.shape[1], n), rows, w) if bias is not None else torch.bmm(rows, w)
    return [part.reshape(len(u), *x.shape[1:-1], n) for part, u in zip(y, units)]


def conv_backend(x, args, kwargs):
    """The kernel torch picks for this convolution on these rows (None where not known here)."""
    import torch

    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    given = [*args[3:7]] + [None] * (4 - len(args[3:7]))
    stride, padding, dilation, groups = (given[0] or 1), (given[1] or 0), (given[2] or 1), (given[3] or 1)
    if isinstance(padding, str):
        return None

    def two(v):
        return list(v) if isinstance(v, (tuple, list)) else [v, v]

    return torch._C._select_conv_backend(x, weight, bias, two(stride), two(padding), two(dilation), False, [0, 0],
                                         groups, None)


def call_with_mkldnn(mkldnn, func, rows, args, kwargs):
    """func on `rows`, with oneDNN on or off (None: as it is), so that a merged call runs the points' own kernel."""
    import torch

    if mkldnn is None:
        return func(rows, *args[1:], **kwargs)
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(mkldnn)
    try:
        return func(rows, *args[1:], **kwargs)
    finally:
        torch._C._set_mkldnn_enabled(before)


def plan_and_group(configs) -> list[list[list[Point]]]:
    """The launcher's step 1: each composed job config (with its `hydra` node, as Hydra's launcher composed it)
    checked as its job will check it; the points that can fuse, grouped and batched. A point that fails here is
    simply not fused: its own job refuses it, or draws it alone."""
    points = []
    for index, config in enumerate(configs):
        try:
            point = _point(index, config)
        except Exception:  # noqa: BLE001  (its own job says what is wrong with it)
            point = None
        if point is not None:
            points.append(point)
    return group(points)


def _point(index: int, config) -> Point | None:
    import copy
    import os

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    from runner.context import config_hash
    from runner.jobdir import finished, kept_images
    from runner.spec import make_spec

    config = copy.deepcopy(config)
    HydraConfig.instance().set_config(config)  # as run_job does, so that hydra-node interpolations resolve
    job_dir = os.path.abspath(os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")),
                                           str(OmegaConf.select(config, "hydra.sweep.subdir"))))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = job_dir
    HydraConfig.instance().set_config(config)
    cfg = copy.deepcopy(config)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    if cfg.get("dry_run") or cfg.get("optimize"):
        return None
    digest = config_hash(cfg)
    spec = make_spec(cfg)
    plan = [(prompt, seed) for prompt in spec.prompts for seed in spec.seeds]
    if finished(Path(job_dir), digest) or kept_images(Path(job_dir), plan, digest):
        return None  # resume: done, or partly drawn (its job keeps what is there and draws the rest)
    return Point(index=index, spec=spec, job_dir=job_dir, config_hash=digest, job_num=config.hydra.job.num)
