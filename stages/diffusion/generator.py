"""Generator folders: a diffusion teacher or a consistency student on disk, in diffusers' layout.

```
<dir>/model_index.json     pipeline class + components, as diffusers writes it
<dir>/unet/ or denoiser/   the network (config.json + diffusion_pytorch_model.safetensors)
<dir>/scheduler/           scheduler_config.json: DDPMScheduler (teachers), LCMScheduler (consistency
                           students), CMStochasticIterativeScheduler (consistency-train), DDIMScheduler
                           (multistep and progressive students, sampled with DDIM),
                           FlowMatchEulerDiscreteScheduler (flow maps: a ``denoiser/`` and DistilGeneratorPipeline)
<dir>/.manifest.json       distil provenance (kind "generator"), training.json beside it
```

Images (``UNet2DModel``) name ``DDPMPipeline`` (``ConsistencyModelPipeline`` with a
``CMStochasticIterativeScheduler``, ``DDIMPipeline`` with a ``DDIMScheduler``: ``UNET_PIPELINES``),
so ``DiffusionPipeline.from_pretrained(dir)`` loads teacher and student with diffusers alone
(an LCM student's ``LCMScheduler`` makes
``DDPMPipeline`` sample it as a multistep consistency model; diffusers logs that it
expected a DDPM scheduler). The 2-D ``MLPDenoiser`` names ``DistilGeneratorPipeline``
(``stages.diffusion.pipeline``): ``DistilGeneratorPipeline.from_pretrained(dir)`` or the
components one by one (``MLPDenoiser.from_pretrained(dir, subfolder="denoiser")``,
``LCMScheduler.from_pretrained(dir, subfolder="scheduler")``); a bare
``DiffusionPipeline.from_pretrained`` cannot, as diffusers only resolves its own pipeline
classes by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.artifacts import artifact_hash, write_json
from stages.diffusion.schedule import FlowSchedule, KarrasSchedule, NoiseSchedule
from stages.errors import DistilError

MODEL_INDEX = "model_index.json"
GUIDED = "guidance.json"
"""A ``cfg-distill`` student's conditions: ``{"classes": K, "weights": [w...]}``; its network's
condition index is ``weights.index(w) * (K + 1) + class`` (class K: the null class)."""
MODEL_CLASSES = (("diffusers", "UNet2DModel"), ("stages.diffusion.models", "MLPDenoiser"),
                 ("stages.diffusion.models", "TimestepExperts"), ("stages.diffusion.models", "ClassExperts"))
"""The only network classes a generator folder may name: nothing else is imported from a path.
(diffusers itself is imported only when a folder is loaded or saved, so checking for a
generator folder stays cheap for the CLI.)"""
CONSISTENCY_SCHEDULERS = ("LCMScheduler", "CMStochasticIterativeScheduler")
"""Schedulers of consistency models (multistep consistency sampling); any other is sampled as a diffusion model."""
KARRAS_SCHEDULERS = ("CMStochasticIterativeScheduler",)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
"""Flow maps (``flow-map``): X_{sigma, tau}(x) = x + (tau - sigma) u(x, sigma, tau) on the linear interpolant."""
"""Variance-exploding schedulers on Karras noise levels (``KarrasSchedule``)."""
UNET_PIPELINES = {"CMStochasticIterativeScheduler": "ConsistencyModelPipeline", "DDIMScheduler": "DDIMPipeline"}
"""The diffusers pipeline an image folder names, by its scheduler (DDPMPipeline otherwise): the one
that samples it as trained (a consistency model's input scaling, DDIM's eta 0)."""


@dataclass
class Generator:
    path: Path
    model: torch.nn.Module
    scheduler: Any
    schedule: NoiseSchedule | KarrasSchedule | FlowSchedule
    kind: str
    """'diffusion' (sampled with an ODE solver), 'consistency' (multistep consistency sampling) or
    'flow-map' (jumps of the flow map along an even grid of the interpolant's time)."""
    sample_shape: list[int]
    classes: int = 0
    """Classes the network is conditioned on (0: unconditional; ``stages.diffusion.models.classes_of``)."""
    labels: torch.Tensor | None = None
    """The class of each row ``denoise`` sees, set by ``conditioned`` (None: the null class)."""
    guidance: float = 0.0
    weights: tuple[float, ...] = ()
    """A ``cfg-distill`` student's guidance weights (``GUIDED``): one network call per step gives
    the guided prediction; () for a model guided by combining two calls."""

    @property
    def timestep_scaling(self) -> float:
        return float(self.scheduler.config.get("timestep_scaling", 10.0))

    def conditioned(self, labels: torch.Tensor | None, guidance: float = 0.0) -> Generator:
        """This generator sampling class ``labels[i]`` at row i, with classifier-free guidance weight
        ``guidance`` (Ho & Salimans 2022, eq. 6 with w = ``guidance``): (1 + w) F(x, c) - w F(x, null)."""
        if labels is None and guidance == 0:
            return self
        if not self.classes:
            raise DistilError(f"{self.path} is an unconditional generator: class labels and guidance need a class-conditional "
                              "teacher (distill --method denoise --set diffusion.classes=K)")  # fmt: skip
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.classes):
            raise DistilError(f"class {int(labels.max())} is outside {self.path}'s label set 0..{self.classes - 1}")
        if self.weights and labels is not None and float(guidance) not in self.weights:
            raise DistilError(f"{self.path} was distilled for guidance weights {list(self.weights)}; {guidance:g} is not one of "
                              "them: pick one in evaluate.guidance, or distil with that weight in diffusion.guidance_weights")  # fmt: skip
        return dataclasses.replace(self, labels=labels, guidance=float(guidance))

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The raw network output at (x_t, t) for per-row integer timesteps t [B]: of the rows'
        classes (``conditioned``; the null class without), guided when ``guidance`` > 0."""
        t = t.to(x.device)
        if not self.classes:
            return self.model(x, t).sample
        null = torch.full((len(x),), self.classes, dtype=torch.long, device=x.device)
        if self.weights:  # a cfg-distill student: the guided prediction in one call (the null class: any weight's copy)
            if self.labels is None:
                return self.model(x, t, class_labels=null).sample
            g = self.weights.index(self.guidance)
            return self.model(x, t, class_labels=g * (self.classes + 1) + self.labels.to(x.device)).sample
        if self.labels is None:
            return self.model(x, t, class_labels=null).sample
        cond = self.model(x, t, class_labels=self.labels.to(x.device)).sample
        if self.guidance == 0:
            return cond
        return (1 + self.guidance) * cond - self.guidance * self.model(x, t, class_labels=null).sample

    def identity(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": generator_hash(self.path), "kind": self.kind, "sample_shape": self.sample_shape,
                "scheduler": type(self.scheduler).__name__, "prediction_type": self.schedule.prediction}  # fmt: skip


def is_generator(path: str | Path) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def generator_hash(path: str | Path) -> str:
    """Content hash of a generator folder: the network's files and the scheduler config
    (its noise schedule and prediction type), which ``artifact_hash`` alone leaves out."""
    scheduler = Path(path) / "scheduler" / "scheduler_config.json"
    extra = scheduler.read_bytes() if scheduler.is_file() else b""
    return hashlib.sha256(artifact_hash(Path(path)).encode() + extra).hexdigest()


def load_generator(path: str | Path, device: torch.device | str = "cpu", what: str = "generator") -> Generator:
    path = Path(path)
    if not is_generator(path):
        raise DistilError(f"{what} {path} is not a generator folder (no {MODEL_INDEX}); train one with distill --method denoise")
    try:
        index = json.loads((path / MODEL_INDEX).read_text())
    except json.JSONDecodeError:
        raise DistilError(f"{path}/{MODEL_INDEX} is not valid JSON; retrain or re-save the generator") from None
    parts = {k: v for k, v in index.items() if not k.startswith("_") and k != "scheduler"}
    if len(parts) != 1 or "scheduler" not in index:
        raise DistilError(f"{path}/{MODEL_INDEX} must name one network and a scheduler, got {sorted(index)}")
    ((component, spec),) = parts.items()
    if tuple(spec) not in MODEL_CLASSES:
        raise DistilError(
            f"{what} {path}: network class {spec} is not one distil loads ({', '.join(c for _, c in MODEL_CLASSES)})"
        )
    import diffusers

    from stages.diffusion.models import classes_of, sample_shape_of

    cls = getattr(importlib.import_module(spec[0]), spec[1])
    scheduler_cls = getattr(diffusers, str(index["scheduler"][1]), None)
    if index["scheduler"][0] != "diffusers" or not (
        isinstance(scheduler_cls, type) and issubclass(scheduler_cls, diffusers.SchedulerMixin)
    ):
        raise DistilError(f"{what} {path}: scheduler {index['scheduler']} is not a diffusers scheduler")
    try:
        model = cls.from_pretrained(path, subfolder=component, use_safetensors=True).to(device).eval()  # never a *.bin pickle
        scheduler = scheduler_cls.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError, TypeError) as exc:
        raise DistilError(f"cannot load {what} {path} ({str(exc).splitlines()[0][:160]}); retrain it") from None
    model.requires_grad_(False)
    name = type(scheduler).__name__
    kind = "consistency" if name in CONSISTENCY_SCHEDULERS else "flow-map" if name in FLOW_SCHEDULERS else "diffusion"
    schedule_cls = KarrasSchedule if name in KARRAS_SCHEDULERS else FlowSchedule if name in FLOW_SCHEDULERS else NoiseSchedule
    schedule = schedule_cls.of(scheduler, f"{what} {path}")
    guided = json.loads((path / GUIDED).read_text()) if (path / GUIDED).is_file() else None
    classes, weights = (int(guided["classes"]), tuple(float(w) for w in guided["weights"])) if guided else (classes_of(model), ())
    return Generator(path, model, scheduler, schedule, kind, sample_shape_of(model), classes, weights=weights)


def save_generator(directory: Path, model: torch.nn.Module, scheduler, guided: dict | None = None) -> None:
    """Write ``model`` and ``scheduler`` as diffusers components with a ``model_index.json``
    (and a ``cfg-distill`` student's conditions, ``guided``, as ``GUIDED``)."""
    import diffusers

    directory = Path(directory)
    flow = type(scheduler).__name__ in FLOW_SCHEDULERS  # no diffusers pipeline samples a two-time flow map: distil's does
    component = "unet" if isinstance(model, diffusers.UNet2DModel) and not flow else "denoiser"
    library = "diffusers" if isinstance(model, diffusers.UNet2DModel) else type(model).__module__
    model.save_pretrained(directory / component, safe_serialization=True)
    scheduler.save_pretrained(directory / "scheduler")
    write_json(directory / MODEL_INDEX, {
        "_class_name": UNET_PIPELINES.get(type(scheduler).__name__, "DDPMPipeline") if component == "unet"
                       else "DistilGeneratorPipeline",
        "_diffusers_version": diffusers.__version__,
        component: [library, type(model).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    })  # fmt: skip
    if guided:
        write_json(directory / GUIDED, guided)


def merge_generators(a: str | Path, b: str | Path, alpha: float, dest: Path) -> Path:
    """The generator whose weights are (1 - alpha) theta_a + alpha theta_b (model merging of two
    students of one teacher, Cideron et al. 2024, section 4: interpolating a quality- and a
    diversity-tuned student trades one for the other), saved at ``dest`` with ``a``'s scheduler."""
    if not 0 <= alpha <= 1:
        raise DistilError(f"merge weights must be in [0, 1], got {alpha}")
    ga, gb = load_generator(a, "cpu", "merged model"), load_generator(b, "cpu", "merged model")
    public = lambda g: {k: v for k, v in g.model.config.items() if not k.startswith("_")}  # noqa: E731  (not its path)
    same = (type(ga.model) is type(gb.model) and public(ga) == public(gb)
            and (ga.classes, ga.weights) == (gb.classes, gb.weights) and type(ga.scheduler) is type(gb.scheduler))  # fmt: skip
    if not same:
        raise DistilError(f"{a} and {b} cannot be merged: their networks, conditions or schedulers differ (merge two students "
                          "of one teacher trained with the same settings)")  # fmt: skip
    other = gb.model.state_dict()
    merged = {k: (1 - alpha) * v + alpha * other[k] if v.is_floating_point() else v for k, v in ga.model.state_dict().items()}
    ga.model.load_state_dict(merged)
    guided = {"classes": ga.classes, "weights": list(ga.weights)} if ga.weights else None
    save_generator(dest, ga.model, ga.scheduler, guided=guided)
    return dest


def check_same_shape(a: list[int], b: list[int], what_a: str, what_b: str) -> None:
    if list(a) != list(b):
        raise DistilError(f"{what_a} makes samples of shape {list(a)} but {what_b} has {list(b)}; use matching data and models")
