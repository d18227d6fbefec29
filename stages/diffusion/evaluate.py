"""`distil evaluate` for generators: sample every model at every step count and measure
the samples against the real data, in one table.

A generator is a diffusers folder (``model_index.json`` and a ``scheduler/`` subfolder,
``_is_generator_folder``); samples come from ``stages.diffusion.sampling.sample_generator(path,
n, steps, seed, solver=, device=)`` (or the injected ``sampler``), [n, 2] points for the
2-D toys and [n, 1, H, W] images in [-1, 1] for digits. Sample i starts from noise seeded
``seed + i`` for every model and step count, so rows share their noise: the paired error
and the ``*_at_floor_n`` metrics (first ``floor_n`` samples) rely on that. With
``evaluate.hybrid_first_step``, consistency students also get rows ``<model>+hybrid`` (that
teacher takes the first step) for step counts >= 2.

The real data comes from ``stages.diffusion.data.load_generator_data`` (the toys are
standardised there; the mode geometry fits any per-axis scale and shift).

One row per (model, steps):

- 2-D toys: ``sw`` (sliced Wasserstein-2 to the real train data), ``mmd2`` (unbiased
  RBF MMD^2, bandwidths fixed from the train data), and for the named toys ``hq_rate``,
  ``modes_covered``, ``mode_entropy`` (``stages.diffusion.metrics.toy_modes``);
- digits: ``fd`` (Frechet distance to the train images in the feature space of a small
  digits classifier trained here on the train split, saved as
  ``digits_classifier.safetensors``), ``class_entropy``, ``classes_covered`` and
  ``confidence`` from its predictions, and in the same feature space fidelity and diversity
  apart: ``precision`` / ``recall`` and ``density`` / ``coverage`` against the train images
  (``stages.diffusion.metrics.manifold``; recall and coverage grow with the number of samples,
  so the floor's, from fewer rows, reads lower);
- ``paired_error`` (with a teacher): mean L2 distance to the teacher's
  ``teacher_steps``-step samples for the same noise;
- ``seconds_per_1k``: marginal sampling cost (``stages.diffusion.metrics.timing``).

Each metric's floor (``*_floor``) is the same metric for held-out real data against the
same train reference: the test split (``floor_n`` = min(n_samples, test rows) of it), or
half of the train split when there is no test split. A generator sampled with more rows
than the floor compares with less small-sample bias, so ``sw_at_floor_n`` /
``fd_at_floor_n`` repeat the metric on its first ``floor_n`` samples. Samples with NaN or
inf are counted (``nonfinite_rate``) and left out of the metrics.

Writes ``metrics.json`` (``{"<model>/steps_<k>": {...}, "floor": {...}}``),
``generators.csv`` (the table), ``summary.txt``, ``plots/samples.png`` (scatter panels
model x steps over the data, or image rows), ``plots/modes.csv`` / ``plots/classes.csv``
(per-mode / per-class counts, long format) and the manifest.
"""

from __future__ import annotations

import csv
import inspect
import io
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from stages.artifacts import Kind, Output, artifact_hash, fingerprint, write_json, write_manifest
from stages.config import DataConfig, EvaluateConfig, to_dict
from stages.diffusion.metrics.distances import (
    as_points,
    mmd2,
    mmd_bandwidths,
    paired_error,
    sliced_wasserstein,
    subsample,
)
from stages.diffusion.metrics.timing import seconds_per_1k
from stages.diffusion.metrics.toy_modes import mode_coverage, toy_modes, toy_name
from stages.errors import DistilError

REFERENCE_MAX = 5_000  # real rows the sliced Wasserstein reference keeps (POT cost grows with n + m)
MMD_MAX = 2_000  # rows per side of an MMD (its cost is quadratic; subsampling keeps it unbiased)
GRID_COLUMNS = 16  # images per row of plots/samples.png

Sampler = Callable[..., Any]
"""``sampler(path, n, steps, seed, **options)`` -> n samples [n, ...] (tensor or array); options
(``solver``, ``device``, ``hybrid_first_step_teacher``) are passed when it takes them."""


def _is_generator_folder(path: str | Path) -> bool:
    """A diffusers folder: ``model_index.json`` next to a ``scheduler/`` subfolder."""
    p = Path(path)
    return (p / "model_index.json").is_file() and (p / "scheduler").is_dir()


def _default_sampler() -> Sampler:
    from stages.diffusion.sampling import sample_generator  # lazy: the diffusion stack is optional here

    return sample_generator


def _sample(sampler: Sampler, path: Path, n: int, steps: int, seed: int, **options: Any) -> np.ndarray:
    """``sampler(path, n, steps, seed, **options)`` as float64 numpy; options the sampler
    does not take (a fake one in a test) are dropped, ``None`` ones are not passed."""
    try:
        params = inspect.signature(sampler).parameters
        open_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        options = {k: v for k, v in options.items() if v is not None and (open_kw or k in params)}
    except (TypeError, ValueError):
        options = {}
    out = sampler(path, n, steps, seed, **options)
    x = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float64)
    if x.ndim < 2 or len(x) != n:
        raise DistilError(f"{path}: the sampler returned shape {x.shape} for {n} samples; expected [{n}, ...]")
    return x


def _finite(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x.reshape(len(x), -1)).all(1)


def _kind(path: Path) -> str:
    """'consistency' or 'diffusion', from the scheduler named in model_index.json."""
    import json

    try:
        scheduler = json.loads((path / "model_index.json").read_text()).get("scheduler", [None, None])[1]
    except (json.JSONDecodeError, AttributeError, IndexError, TypeError):
        raise DistilError(f"{path}/model_index.json is not a diffusers model index; re-save the generator") from None
    return "consistency" if scheduler == "LCMScheduler" else "diffusion"


def _real_data(data: str, data_cfg: DataConfig) -> Any:
    from stages.diffusion.data import load_generator_data

    return load_generator_data(data, data_cfg)


def _reference_holdout(train: np.ndarray, test: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) when the test split has 2+ rows, else two disjoint random halves of train."""
    if test is not None and len(test) >= 2:
        return train, test
    if len(train) < 4:
        raise DistilError(f"the real data has {len(train)} train rows and no test split; need at least 4 rows for a floor")
    perm = np.random.default_rng(seed).permutation(len(train))
    return train[perm[: len(train) // 2]], train[perm[len(train) // 2 :]]


class _Points:
    """Metrics of 2-D samples against the real train data."""

    kind = "points"

    def __init__(self, data: str, splits: dict[str, Any], n: int, seed: int):
        train = as_points(splits["train"], f"{data} train data", min_rows=4)
        test = splits.get("test")
        test = as_points(test, f"{data} test data") if test is not None and len(test) >= 2 else None
        self.reference, holdout = _reference_holdout(train, test, seed)
        self.holdout = subsample(holdout, n, seed)
        self.floor_n = len(self.holdout)
        self.sw_ref = subsample(self.reference, REFERENCE_MAX, seed)
        self.mmd_ref = subsample(self.reference, MMD_MAX, seed)
        self.bandwidths = mmd_bandwidths(self.reference, seed=seed)
        self.modes = toy_modes(data, self.reference) if toy_name(data) else None
        self.floor = self.measure(self.holdout, floor=True)
        self.floor["floor_n"] = self.floor_n

    def measure(self, x: np.ndarray, floor: bool = False) -> dict[str, Any]:
        m: dict[str, Any] = {
            "sw": sliced_wasserstein(x, self.sw_ref),
            "mmd2": mmd2(subsample(x, MMD_MAX), self.mmd_ref, self.bandwidths),
        }
        if not floor:
            m["sw_at_floor_n"] = sliced_wasserstein(x[: self.floor_n], self.sw_ref) if len(x) > self.floor_n else m["sw"]
        if self.modes is not None:
            c = mode_coverage(x, self.modes)
            m.update({k: c[k] for k in ("hq_rate", "modes_covered", "mode_entropy", "n_modes")})
            m["_counts"] = [c["mode_counts"], c["mode_hq_counts"]]
        return m

    def columns(self) -> list[str]:
        cols = ["sw", "sw_floor", "sw_at_floor_n", "mmd2", "mmd2_floor"]
        if self.modes is not None:
            cols += ["hq_rate", "hq_rate_floor", "modes_covered", "n_modes", "mode_entropy", "mode_entropy_floor"]
        return cols

    def shape(self, x: np.ndarray, path: Path) -> np.ndarray:
        x = x.reshape(len(x), -1)
        if x.shape[1] != 2:
            raise DistilError(f"{path}: samples have {x.shape[1]} values each; the data is 2-D")
        return x

    def write_plots(
        self,
        plots: Path,
        samples: dict[tuple[str, int], np.ndarray],
        names: list[str],
        steps: list[int],
        extra: dict[str, np.ndarray],
    ) -> None:
        from stages.diffusion.metrics.plots import write_scatter_grid

        panels = [[samples.get((m, k)) for k in steps] for m in names]
        labels = list(names)
        for label, x in extra.items():
            panels.append([x] + [None] * (len(steps) - 1))
            labels.append(label)
        write_scatter_grid(
            plots / "samples.png", panels, self.reference, row_labels=labels, col_labels=[f"{k} steps" for k in steps]
        )

    def write_counts(self, plots: Path, rows: list[dict[str, Any]]) -> None:
        if self.modes is None:
            return
        with open(plots / "modes.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["model", "steps", "mode", "count", "hq_count"])
            for r in rows:
                if r.get("_counts"):
                    counts, hq = r["_counts"]
                    w.writerows([r["model"], r["steps"], i, c, h] for i, (c, h) in enumerate(zip(counts, hq, strict=True)))


class _Images:
    """Metrics of digits images in a digits classifier's feature space."""

    kind = "images"

    def __init__(self, splits: dict[str, Any], labelled: Any, n: int, seed: int, classifier: Any = None):
        """``splits``: the data's images by split; ``labelled``: labelled real digits
        (``GeneratorData`` of digits-images) to train and test the classifier on."""
        from stages.diffusion.metrics.digits_features import accuracy, digit_features, train_digits_classifier

        self.control_class: int | None = None
        """The class of ``evaluate.control``'s adapter: every row gets the share of its samples of that class."""

        test = splits.get("test")
        test = np.asarray(test, np.float32) if test is not None and len(test) >= 2 else None
        self.reference, holdout = _reference_holdout(np.asarray(splits["train"], np.float32), test, seed)
        x_tr, y_tr = labelled.splits["train"], labelled.labels["train"]
        self.real_train, self.real_labels = x_tr, y_tr
        self.classifier = classifier or train_digits_classifier(x_tr, y_tr, size=int(x_tr.shape[-1]), seed=seed)
        self.test_accuracy = accuracy(self.classifier, labelled.splits["test"], labelled.labels["test"])
        self.ref_features = digit_features(self.classifier, self.reference)
        self.holdout = subsample(holdout, n, seed)
        self.floor_n = len(self.holdout)
        self.floor = self.measure(self.holdout, floor=True)
        self.floor.update(floor_n=self.floor_n, classifier_test_accuracy=self.test_accuracy, class_accuracy=self.test_accuracy)
        self.guided = False
        """Whether the table has guided rows of class-conditional generators (set by ``evaluate_generators``)."""

    def measure(self, x: np.ndarray, floor: bool = False, labels: np.ndarray | None = None) -> dict[str, Any]:
        """The metrics of samples ``x``; with ``labels`` (the class each was asked for) also
        ``stages.diffusion.metrics.digits_features.class_conditional``'s."""
        from stages.diffusion.metrics.digits_features import class_conditional, class_coverage, digit_features
        from stages.diffusion.metrics.distances import frechet_between
        from stages.diffusion.metrics.manifold import manifold_metrics

        feats = digit_features(self.classifier, x)
        m: dict[str, Any] = {"fd": frechet_between(feats, self.ref_features), **manifold_metrics(self.ref_features, feats)}
        if labels is not None:
            m.update(class_conditional(self.classifier, x, labels, self.real_train, self.real_labels))
        if not floor:
            m["fd_at_floor_n"] = frechet_between(feats[: self.floor_n], self.ref_features) if len(x) > self.floor_n else m["fd"]
        c = class_coverage(self.classifier, x)
        m.update({k: c[k] for k in ("class_entropy", "classes_covered", "confidence")})
        m["_counts"] = [c["class_counts"]]
        if self.control_class is not None:
            m["control_share"] = c["class_counts"][self.control_class] / max(1, len(x))
        return m

    def columns(self) -> list[str]:
        return [
            "fd",
            "fd_floor",
            "fd_at_floor_n",
            "class_entropy",
            "class_entropy_floor",
            "classes_covered",
            "confidence",
            "confidence_floor",
            "precision",
            "precision_floor",
            "recall",
            "recall_floor",
            "density",
            "coverage",
            "coverage_floor",
            *(["guidance", "class_accuracy", "class_accuracy_floor", "fd_per_class", "diversity", "diversity_real"]
              if self.guided else []),
            *(["control_share"] if self.control_class is not None else []),
        ]

    def shape(self, x: np.ndarray, path: Path) -> np.ndarray:
        if x.ndim == 2:
            side = int(round(x.shape[1] ** 0.5))
            x = x.reshape(len(x), 1, side, side) if side * side == x.shape[1] else x
        elif x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
            raise DistilError(f"{path}: samples of shape {x.shape[1:]} are not grey square images [1, H, H]")
        return x.astype(np.float32)

    def write_plots(
        self,
        plots: Path,
        samples: dict[tuple[str, int], np.ndarray],
        names: list[str],
        steps: list[int],
        extra: dict[str, np.ndarray],
    ) -> None:
        from stages.diffusion.metrics.plots import write_image_grid

        rows, labels = [], []
        for (m, k), x in samples.items():
            rows.append(x[:GRID_COLUMNS])
            labels.append(f"{m} @{k}")
        for label, x in {"real test": self.holdout, **extra}.items():
            if x.shape[-1] == rows[0].shape[-1]:
                rows.append(x[:GRID_COLUMNS])
                labels.append(label)
        write_image_grid(plots / "samples.png", rows, labels=labels)

    def write_counts(self, plots: Path, rows: list[dict[str, Any]]) -> None:
        with open(plots / "classes.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["model", "steps", "class", "count"])
            for r in rows:
                if r.get("_counts"):
                    w.writerows([r["model"], r["steps"], i, c] for i, c in enumerate(r["_counts"][0]))


def _check(models: list[Path], steps: list[int], cfg: EvaluateConfig, teacher: Path | None, hybrid: Path | None) -> None:
    if not models:
        raise DistilError("nothing to evaluate: pass at least one --model generator folder")
    for p in [*models, *([teacher] if teacher else [])]:
        if not _is_generator_folder(p):
            raise DistilError(f"{p} is not a generator folder (needs model_index.json and scheduler/); pass a diffusers folder")
    names = [p.name for p in models]
    if len(set(names)) != len(names):
        raise DistilError(f"model names must be unique (directory names {names}); rename the directories")
    if not steps or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in steps):
        raise DistilError(f"evaluate.step_counts must be a non-empty list of positive integers, got {steps}")
    if cfg.n_samples < 2 or cfg.teacher_steps < 1 or cfg.time_samples < 0:
        raise DistilError("evaluate.n_samples must be >= 2, teacher_steps >= 1 and time_samples >= 0 (0 = no timing)")
    if hybrid is not None and not _is_generator_folder(hybrid):
        raise DistilError(
            f"evaluate.hybrid_first_step {hybrid} is not a generator folder (needs model_index.json and scheduler/)"
        )


def evaluate_generators(
    models: list[str | Path],
    data: str,
    steps: list[int],
    cfg: EvaluateConfig,
    out: Path,
    *,
    data_cfg: DataConfig | None = None,
    teacher: str | Path | None = None,
    sampler: Sampler | None = None,
    real: Any = None,
    classifier: Any = None,
    device: str = "auto",
    console: Console | None = None,
) -> Path:
    """Evaluate generator folders ``models`` at each of ``steps`` on ``data`` (a 2-D toy,
    ``digits-images`` or diffusion teacher data); write the table and plots to ``out``.

    ``teacher`` (default ``cfg.teacher``) enables the paired error; ``sampler`` defaults to
    ``stages.diffusion.sampling.sample_generator``; ``real`` replaces the data loader (a
    ``GeneratorData`` or a dict of split -> samples); ``classifier`` is a trained
    ``DigitsClassifier`` (otherwise one is trained on the labelled digits-images)."""
    data_cfg = data_cfg or DataConfig()
    models, derived = _derived([Path(p) for p in models], cfg)
    teacher = Path(teacher) if teacher else (Path(cfg.teacher) if cfg.teacher else None)
    hybrid = Path(cfg.hybrid_first_step) if cfg.hybrid_first_step else None
    steps = list(steps)
    _check(models, steps, cfg, teacher, hybrid)
    sampler = sampler or _default_sampler()
    from stages.devices import resolve_device

    options = {"solver": cfg.solver, "device": str(resolve_device(device))}
    space = _space(real if real is not None else _real_data(str(data), data_cfg), str(data), data_cfg, cfg, classifier)
    if cfg.control:
        if not isinstance(space, _Images):
            raise DistilError("evaluate.control scores samples by class with the digits classifier: evaluate on digits-images")
        from stages.diffusion.control import read_control

        space.control_class = int(read_control(cfg.control)["class"])
    runs = _runs(models, steps, hybrid, _guided(models, cfg.guidance, space))

    params = {"evaluate": to_dict(cfg), "data": to_dict(data_cfg), "steps": steps}
    folders = [
        *models,
        *([teacher] if teacher else []),
        *([hybrid] if hybrid else []),
        *([Path(cfg.control)] if cfg.control else []),
    ]
    inputs = {"data": str(data), **{str(p): artifact_hash(p) for p in folders}}
    output = Output(out, fingerprint("evaluate", params, inputs))
    with output as work:
        ref = _teacher_reference(space, sampler, cfg, teacher, options)
        extra = {} if ref is None else {f"teacher @{cfg.teacher_steps}": ref[_finite(ref)]}
        rows: list[dict[str, Any]] = []
        samples: dict[tuple[str, int], np.ndarray] = {}
        for label, path, k, first, w in runs:
            opts = {**options, "hybrid_first_step_teacher": first, "guidance": w}
            row, samples[(label, k)] = _measure_run(space, sampler, cfg, path, k, opts, ref)
            rows.append({"model": label, "steps": k, **({"guidance": w} if w is not None else {}), **row})
        columns = _columns(space, ref is not None, cfg.time_samples > 0)
        table, metrics = _tabulate(rows, columns, space.floor)
        write_json(work / "metrics.json", metrics)
        _write_csv(work / "generators.csv", columns, table)
        _write_plots(work / "plots", space, samples, list(dict.fromkeys(r[0] for r in runs)), steps, extra, rows)
        if isinstance(space, _Images):
            from stages.diffusion.metrics.digits_features import save_digits_classifier

            save_digits_classifier(space.classifier, work / "digits_classifier.safetensors",
                                   {"test_accuracy": space.test_accuracy, "seed": cfg.seed})  # fmt: skip
        _write_summary(work, columns, table, console)
        for name, kept in derived.items():  # the derived models, kept with the table that scores them
            shutil.copytree(kept.name, work / name)
            kept.cleanup()
        write_manifest(work, kind=Kind.GENERATOR_EVALUATION, params=params, inputs=inputs,
                       extra={"task": {"name": str(data), "kind": space.kind}, "metrics": metrics})  # fmt: skip
        return output.commit()


def _space(real: Any, data: str, data_cfg: DataConfig, cfg: EvaluateConfig, classifier: Any) -> _Points | _Images:
    """The metric space of the real data: images (4-D train samples) or 2-D points."""
    splits = real.splits if hasattr(real, "splits") else dict(real)
    if np.asarray(splits["train"]).ndim == 4:
        labelled = real if getattr(real, "labels", None) else _real_data("digits-images", data_cfg)
        return _Images(splits, labelled, cfg.n_samples, cfg.seed, classifier)
    return _Points(data, splits, cfg.n_samples, cfg.seed)


def _runs(models: list[Path], steps: list[int], hybrid: Path | None,
          guided: dict[Path, int]) -> list[tuple[str, Path, int, Path | None, float | None]]:  # fmt: skip
    """(label, folder, steps, hybrid teacher, guidance weight): every model at every count;
    hybrid rows for students; a class-conditional model (``guided``) also at every guidance weight."""
    runs = [(p.name, p, k, None, None) for p in models for k in steps]
    if hybrid is not None:
        runs += [(f"{p.name}+hybrid", p, k, hybrid, None) for p in models if _kind(p) == "consistency" for k in steps if k >= 2]
    runs += [(f"{p.name}+w{w:g}", p, k, None, float(w)) for p, ws in guided.items() for w in ws for k in steps]
    return runs


def _derived(models: list[Path], cfg: EvaluateConfig) -> tuple[list[Path], dict[str, tempfile.TemporaryDirectory]]:
    """``models`` plus the ones ``merge`` and ``control`` derive from them, and the temporary
    folders that hold those (by the name they are kept under in the output)."""
    kept: dict[str, tempfile.TemporaryDirectory] = {}
    if cfg.merge:
        kept["merged"] = tempfile.TemporaryDirectory(prefix="distil-merge-")
        models = models + _merged(cfg, Path(kept["merged"].name))
    if cfg.control:
        kept["controlled"] = tempfile.TemporaryDirectory(prefix="distil-control-")
        models = models + _controlled(models, Path(cfg.control), Path(kept["controlled"].name))
    return models, kept


def _merged(cfg: EvaluateConfig, root: Path) -> list[Path]:
    """``merge`` [A, B]: one generator per ``merge_alphas`` weight, (1 - alpha) A + alpha B, named ``A+B@alpha``."""
    from stages.diffusion.generator import merge_generators

    if len(cfg.merge) != 2:
        raise DistilError(f"evaluate.merge names two generator folders [A, B], got {cfg.merge}")
    a, b = (Path(p) for p in cfg.merge)
    return [merge_generators(a, b, float(w), root / f"{a.name}+{b.name}@{w:g}") for w in cfg.merge_alphas]


def _controlled(models: list[Path], control: Path, root: Path) -> list[Path]:
    """``control``: every model with the control-lora adapter merged in unchanged, named ``NAME+control``."""
    from stages.diffusion.control import apply_control

    return [apply_control(p, control, root / f"{p.name}+control") for p in models]


def _guided(models: list[Path], weights: list[float], space) -> dict[Path, list[float]]:
    """The class-conditional models among ``models`` with the guidance weights they are sampled
    at ({} without weights); weights with no class-conditional model, or on 2-D points, are refused."""
    if not weights:
        return {}
    conditional = [p for p in models if _classes(p)]
    if not conditional:
        raise DistilError(f"evaluate.guidance {weights} needs a class-conditional generator (distill --method denoise --set "
                          f"diffusion.classes=10 on digits-images); {', '.join(p.name for p in models)} are unconditional")  # fmt: skip
    if not isinstance(space, _Images):
        raise DistilError("evaluate.guidance scores samples by class with the digits classifier: evaluate on digits-images")
    space.guided = True
    return {p: list(weights) for p in conditional}


def _classes(path: Path) -> int:
    """The classes a generator folder's network is conditioned on, from its config (0: unconditional)."""
    import json

    from stages.diffusion.generator import GUIDED

    if (path / GUIDED).is_file():
        return int(json.loads((path / GUIDED).read_text())["classes"])
    for component, key, offset in (("unet", "num_class_embeds", 1), ("denoiser", "num_classes", 0)):
        config = path / component / "config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get(key) or 0
            return max(int(value) - offset, 0) if value else 0
    return 0


def _teacher_reference(
    space: _Points | _Images, sampler: Sampler, cfg: EvaluateConfig, teacher: Path | None, options: dict[str, Any]
) -> np.ndarray | None:
    """The teacher's ``teacher_steps``-step samples from the same noise as every row (the
    paired error's reference), or None without a teacher."""
    if teacher is None:
        return None
    return space.shape(_sample(sampler, teacher, cfg.n_samples, cfg.teacher_steps, cfg.seed, **options), teacher)


def _measure_run(
    space: _Points | _Images, sampler: Sampler, cfg: EvaluateConfig, path: Path, k: int, opts: dict[str, Any],
    ref: np.ndarray | None,
) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """The metrics of one model at ``k`` steps (without its label), and its finite samples."""
    n, seed = cfg.n_samples, cfg.seed
    x = space.shape(_sample(sampler, path, n, k, seed, **opts), path)
    ok = _finite(x)
    row: dict[str, Any] = {"n": int(ok.sum()), "nonfinite_rate": float(1 - ok.mean())}
    labels = None
    if opts.get("guidance") is not None:
        from stages.diffusion.sampling import sample_labels

        labels = sample_labels(n, _classes(path))[ok]
    if ok.sum() >= 2:
        row.update(space.measure(x[ok]) if labels is None else space.measure(x[ok], labels=labels))
    if ref is not None:
        both = ok & _finite(ref)
        row["paired_error"] = paired_error(x[both], ref[both]) if both.any() else None
    if cfg.time_samples:
        row["seconds_per_1k"] = seconds_per_1k(lambda m: _sample(sampler, path, m, k, seed, **opts), cfg.time_samples, repeats=3)
    return row, x[ok]


def _write_plots(
    plots: Path,
    space: _Points | _Images,
    samples: dict[tuple[str, int], np.ndarray],
    labels: list[str],
    steps: list[int],
    extra: dict[str, np.ndarray],
    rows: list[dict[str, Any]],
) -> None:
    plots.mkdir(exist_ok=True)
    space.write_plots(plots, samples, labels, steps, extra)
    space.write_counts(plots, [*rows, {"model": "real holdout", "steps": 0, **space.floor}])


def _columns(space: _Points | _Images, paired: bool, timed: bool) -> list[str]:
    return [
        "model",
        "steps",
        "n",
        "nonfinite_rate",
        *space.columns(),
        *(["paired_error"] if paired else []),
        *(["seconds_per_1k"] if timed else []),
    ]


def _tabulate(rows: list[dict[str, Any]], columns: list[str], floor: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    """The table (one row per model and step count, in ``columns``) and ``metrics.json``'s
    content: the same values keyed ``<model>/steps_<k>``, plus the floor."""
    table = [{c: _value(r, c, floor) for c in columns} for r in rows]
    metrics = {f"{r['model']}/steps_{r['steps']}": {c: r[c] for c in columns[2:]} for r in table}
    metrics["floor"] = {k: v for k, v in floor.items() if not k.startswith("_")}
    return table, metrics


def _value(row: dict[str, Any], column: str, floor: dict[str, Any]) -> Any:
    if column.endswith("_floor"):
        return floor.get(column[: -len("_floor")])
    v = row.get(column)
    return None if isinstance(v, float) and not np.isfinite(v) else v


def _write_csv(path: Path, columns: list[str], table: list[dict[str, Any]]) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows({c: ("" if r[c] is None else r[c]) for c in columns} for r in table)
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


SUMMARY = ("model", "steps", "sw", "sw_floor", "mmd2", "hq_rate", "modes_covered", "mode_entropy", "fd", "fd_floor",
           "class_entropy", "confidence", "precision", "recall", "class_accuracy", "fd_per_class", "diversity", "paired_error", "seconds_per_1k")  # fmt: skip
"""The columns of the printed table (generators.csv has them all)."""


def _write_summary(work: Path, columns: list[str], table: list[dict[str, Any]], console: Console | None) -> None:
    shown = [c for c in SUMMARY if c in columns]
    t = Table(title="distil: generators (floor = held-out real data; all columns in generators.csv)")
    for c in shown:
        t.add_column(c.replace("_", " "), justify="left" if c == "model" else "right")
    for r in table:
        t.add_row(*[_fmt(r[c]) for c in shown])
    rendered = Console(record=True, width=160, file=io.StringIO())
    rendered.print(t)
    (work / "summary.txt").write_text(rendered.export_text())
    (console or Console()).print(t)


def run(cfg: EvaluateConfig, models: list[Path], data, out: Path, *, data_cfg: DataConfig, cascades: list[Path] = (),
        device: str = "auto", console: Console | None = None) -> Path:  # fmt: skip
    """``distil evaluate`` on generator folders: one row per model and step count."""
    if cascades:
        raise DistilError("evaluate generators (diffusers folders) on their own: no cascades in the same run")
    return evaluate_generators(models, str(data), cfg.step_counts or [cfg.steps], cfg, out, data_cfg=data_cfg,
                               device=device, console=console)  # fmt: skip
