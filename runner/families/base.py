"""What every model family answers, so that spec, components, drawing and precision never name one.

A family is what a model's `model_index.json` names: the components it loads, the sizes it draws, the
schedulers it accepts, its conditioning and its denoising loop, and the diffusers pipeline its loop must
match (the parity tests' oracle). Adding one is one module under runner/families/, one conf/model/*.yaml
and one line in the parity tests.
"""

from dataclasses import dataclass, field
from typing import Any, Callable

# `load(cls, subfolder)`: a component through `cls.from_pretrained`, safely (safetensors, no remote code), in the
# run's dtype for models (not for tokenizers), on the run's device. `load(cls, subfolder, optional=True)` gives
# None where model_index.json has no such component (SD3 without T5, say).
Loader = Callable[..., Any]
# `read_config(subfolder)`: a component's config.json (or scheduler_config.json) as a dict, nothing loaded.
ConfigReader = Callable[[str], dict]


@dataclass
class Components:
    """A loaded model: its denoiser (UNet or transformer), its VAE if any, its text side by model_index.json name
    (tokenizer, text_encoder, tokenizer_2 ...), and the scheduler config every job builds its scheduler from."""

    family: "Family"
    denoiser: Any
    scheduler_config: dict
    vae: Any = None
    text: dict = field(default_factory=dict)
    warmed: set = field(default_factory=set)  # input shapes the denoiser has already run (runner.precision.warm_up)

    def modules(self) -> dict:
        """The torch modules in the order a call uses them: text encoders, denoiser, VAE (for CPU offload)."""
        text = {k: v for k, v in self.text.items() if hasattr(v, "parameters")}
        return {**text, "denoiser": self.denoiser, **({"vae": self.vae} if self.vae is not None else {})}


class Family:
    """The base every family module subclasses; each module exposes one instance as `FAMILY`."""

    name: str = ""            # as recorded in rows: "stable-diffusion", "sdxl" ...
    pipeline: str = ""        # the diffusers pipeline class it reproduces: its parity oracle
    summary: str = ""         # one line for "not a supported family" messages
    conditional: bool = True  # draws from prompts (False: prompts are ignored)
    has_vae: bool = True      # latent diffusion: the VAE options (slicing, tiling) and CPU offload apply
    flow: bool = False        # flow matching (sigma in [0, 1]) rather than a VP (DDPM-style) schedule
    options_key: str | None = None  # a top-level config node of family options (e.g. "sdxl"), if it has one

    def recognise(self, classes: dict[str, str]) -> bool:
        """Whether a model_index.json ({component: class name}, non-null entries only) is this family's."""
        raise NotImplementedError

    def size_rule(self, read_config: ConfigReader) -> tuple[int, int]:
        """(multiple, native size): height and width must be multiples of `multiple`; null sizes take `native`."""
        raise NotImplementedError

    def facts(self, read_config: ConfigReader) -> dict:
        """What this family's `check` needs to know of the model's component configs (read without weights), kept
        in `spec.model_facts`; e.g. whether the UNet takes guidance as an embedding."""
        return {}

    def check(self, spec) -> None:
        """Refuse, with runner.checks.fail, what this family cannot draw (img2img without a VAE, say)."""

    def load(self, load: Loader, scheduler_config: dict) -> Components:
        raise NotImplementedError

    def prepare(self, components: Components, spec, timer) -> Any:
        """Per-job state shared by the job's batches (a prompt-embedding cache, the img2img image ...)."""
        return None

    def sample(self, components: Components, scheduler, spec, prompts: list[str], generators: list, state, timer,
               tally) -> tuple[Any, Any]:
        """Draw one image per generator (prompt i with generator i): (uint8 NHWC numpy images, final latents or
        None for pixel-space models). Pure: no files, no tables, no W&B. `timer(name)` times spans;
        `tally` counts model evaluations (runner.sampling.Tally)."""
        raise NotImplementedError

    def set_schedule(self, components: Components, scheduler, spec) -> None:
        """Set `scheduler` to the schedule this family's loop walks for `spec`. Its loop calls it, and so does a job
        that records a schedule it did not walk itself (its images drawn in a fused batch, or all kept on resume)."""
        from runner.sampling import set_schedule

        set_schedule(scheduler, spec)

    def runs_cfg(self, components: Components, spec) -> bool:
        """Whether the loop runs an unconditional pass beside the conditional one (two forward passes a step)."""
        from runner.sampling import uses_cfg

        return uses_cfg(components.denoiser, spec.guidance)

    def fusable(self, spec) -> bool:
        """Whether this sweep point may share a batch with others like it (runner.fused): a family that answers
        `fuse` fuses its points, unless it says otherwise for this one."""
        return type(self).fuse is not Family.fuse

    def fuse(self, states: list, prompts: list[list[str]]) -> Any:
        """One batch's state from the states of the sweep points it holds (runner.fused): each point's conditioning
        computed by its own state from `prompts[i]`, its images' prompts, as its own batch would, then stacked."""
        raise NotImplementedError

    def warm_up(self, components: Components, spec, batch_size: int) -> None:
        """One denoiser forward with the shapes a batch of `batch_size` images uses (CUDA init, compiling)."""
        raise NotImplementedError
