"""Class-conditional diffusion teachers and classifier-free guidance: the label embedding and its
null class, the guided prediction (1 + w) F(x, c) - w F(x, null), a teacher trained with label
dropout on digits-images, ``evaluate``'s class accuracy per guidance weight (measured on scripted
samplers that give the asked class or not), and the bad inputs refused in one line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from stages.config import DataConfig, DiffusionConfig, EvaluateConfig
from stages.diffusion.evaluate import evaluate_generators
from stages.diffusion.generator import load_generator, save_generator
from stages.diffusion.metrics.digits_features import train_digits_classifier
from stages.diffusion.models import MLPDenoiser, build_denoiser, classes_of
from stages.diffusion.sampling import sample_generator, sample_labels
from stages.errors import DistilError
from stages.tasks.digits_images import digits_images

UNET = ["--set", "diffusion.channels=[8,16]", "--set", "diffusion.norm_groups=4", "--set", "batch_size=16"]
FAST = ["--set", "diffusion.arch=mlp", "--set", "diffusion.width=32", "--set", "diffusion.depth=1", "--set", "batch_size=16"]
"""An MLP denoiser over the flattened 8x8 digits: the cfg-distill tests' teacher (the U-Net path has its own tests)."""


@pytest.fixture(scope="module")
def digits():
    x, y, split = digits_images(DataConfig())
    return {s: (x[split == s], y[split == s]) for s in ("train", "test")}


@pytest.fixture(scope="module")
def clf(digits):
    return train_digits_classifier(*digits["train"], seed=0)


def _folder(root, name: str, classes: int, arch: str = "unet"):
    from diffusers import DDPMScheduler

    cfg = DiffusionConfig(arch=arch, channels=[8, 16], norm_groups=4, width=16, depth=1)
    shape = [1, 8, 8] if arch == "unet" else [2]
    save_generator(root / name, build_denoiser(cfg, shape, 0, classes=classes), DDPMScheduler(num_train_timesteps=20))
    return root / name


@pytest.mark.parametrize("arch", ["unet", "mlp"])
def test_the_guided_prediction_combines_the_conditional_and_the_null_class(tmp_path, arch):
    gen = load_generator(_folder(tmp_path, arch, 10, arch))
    assert gen.classes == 10 == classes_of(gen.model)
    x = torch.randn(4, *gen.sample_shape, generator=torch.Generator().manual_seed(0))
    x[2] = x[1]
    t = torch.full((4,), 7)
    labels = torch.tensor([0, 3, 3, 9])
    null = gen.denoise(x, t)  # no labels: the null class
    cond = gen.conditioned(labels).denoise(x, t)
    assert not torch.allclose(cond, null)
    assert torch.allclose(gen.conditioned(labels, 2.5).denoise(x, t), 3.5 * cond - 2.5 * null, atol=1e-5)
    assert torch.allclose(cond[1], cond[2]) and not torch.allclose(cond[0], cond[1])  # same class, same noise: same output


def test_an_mlp_without_classes_ignores_nothing_and_has_no_label_embedding():
    m = MLPDenoiser(sample_shape=(2,), hidden=8, layers=1, time_dim=8)
    assert m.class_embedding is None and classes_of(m) == 0


def test_a_conditional_teacher_trains_on_digits_with_label_dropout_and_samples_the_asked_classes(tmp_path):
    from conftest import Cli, write_params

    cli = Cli(write_params(tmp_path, data={"limit": 64}))
    cli.ok("distill", "--method", "denoise", "--data", "digits-images", "--out", tmp_path / "t", "--set", "steps=6",
           "--set", "diffusion.classes=10", "--set", "diffusion.label_dropout=0.2", *UNET, "-q")  # fmt: skip
    summary = json.loads((tmp_path / "t" / "training.json").read_text())
    assert summary["classes"] == 10 and summary["label_dropout"] == 0.2
    assert load_generator(tmp_path / "t").classes == 10
    x = sample_generator(tmp_path / "t", 12, 3, 0, guidance=1.5)
    assert x.shape == (12, 1, 8, 8) and torch.isfinite(x).all()
    assert list(sample_labels(12, 10)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    unguided = sample_generator(tmp_path / "t", 12, 3, 0)
    assert not torch.allclose(x, unguided)


class ClassSampler:
    """Scripted samples: a real test image of the asked class (i % 10) for 'right', of the next class for 'wrong'."""

    def __init__(self, digits):
        self.x, self.y = digits["test"]

    def __call__(self, path, n, steps, seed, hybrid_first_step_teacher=None, *, solver="ddim", device="cpu", guidance=None):
        shift = 0 if path.name == "right" else 1
        asked = (np.arange(n) + shift) % 10 if guidance is not None else np.random.default_rng(seed).integers(0, 10, n)
        pick = [np.flatnonzero(self.y == c)[i % (self.y == c).sum()] for i, c in enumerate(asked)]
        return torch.from_numpy(self.x[pick]).float()


def test_evaluate_scores_the_class_of_guided_samples_per_weight(tmp_path, digits, clf):
    models = [_folder(tmp_path, "right", 10), _folder(tmp_path, "wrong", 10), _folder(tmp_path, "plain", 0)]
    cfg = EvaluateConfig(n_samples=200, time_samples=0, guidance=[0.0, 2.0])
    out = evaluate_generators(models, "digits-images", [1], cfg, tmp_path / "ev", sampler=ClassSampler(digits), classifier=clf)
    with open(out / "generators.csv", newline="") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"right", "wrong", "plain", "right+w0", "right+w2", "wrong+w0", "wrong+w2"}  # no guided rows for 'plain'
    assert float(rows["right+w2"]["class_accuracy"]) > 0.9 > 0.2 > float(rows["wrong+w2"]["class_accuracy"])
    assert rows["right+w2"]["guidance"] == "2.0" and rows["right"]["class_accuracy"] == ""
    assert float(rows["right+w2"]["fd_per_class"]) < float(rows["wrong+w2"]["fd_per_class"])
    assert float(rows["right+w0"]["diversity"]) > 0 and float(rows["right+w0"]["class_accuracy_floor"]) > 0.9


def test_guidance_and_classes_where_they_cannot_apply_are_refused(tmp_path, digits, clf):
    from conftest import Cli, write_params

    plain = _folder(tmp_path, "plain", 0)
    with pytest.raises(DistilError, match="unconditional"):
        evaluate_generators([plain], "digits-images", [1], EvaluateConfig(n_samples=20, time_samples=0, guidance=[1.0]),
                            tmp_path / "ev", sampler=ClassSampler(digits), classifier=clf)  # fmt: skip
    assert not (tmp_path / "ev").exists()
    with pytest.raises(DistilError, match="unconditional"):
        sample_generator(plain, 2, 1, 0, guidance=1.0)
    with pytest.raises(DistilError, match="outside"):
        load_generator(_folder(tmp_path, "cond", 10)).conditioned(torch.tensor([3, 10]))
    cli = Cli(write_params(tmp_path, data={"limit": 32}))
    cli.fails("distill", "--method", "denoise", "--data", "moons", "--out", tmp_path / "m", "--set", "diffusion.classes=10",
              "--set", "steps=2", match="no class labels")  # fmt: skip
    cli.fails("distill", "--method", "denoise", "--data", "digits-images", "--out", tmp_path / "m", "--set", "diffusion.classes=5",
              "--set", "steps=2", *UNET, match="outside diffusion.classes=5")  # fmt: skip
    cli.fails("distill", "--method", "consistency-train", "--data", "digits-images", "--out", tmp_path / "m",
              "--set", "diffusion.classes=10", "--set", "steps=2", *UNET, match="diffusion.classes=0")  # fmt: skip
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


# ---- cfg-distill ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("cfg")
    cli = Cli(write_params(root, data={"limit": 64}))
    cli.ok("distill", "--method", "denoise", "--data", "digits-images", "--out", root / "t", "--set", "steps=8",
           "--set", "diffusion.classes=10", *FAST, "-q")  # fmt: skip
    return root, cli


def test_the_widened_student_starts_as_the_teacher_for_every_weight(teacher):
    from stages.diffusion.methods.cfg_distill import guided_target, widen

    root, _ = teacher
    gen = load_generator(root / "t")
    student = widen(gen.model, 3).eval()
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((4,), 5)
    c = torch.tensor([0, 4, 9, 10])
    with torch.no_grad():
        ref = gen.model(x, t, class_labels=c).sample
        for g in range(3):
            assert torch.allclose(student(x, t, class_labels=g * 11 + c).sample, ref, atol=1e-5)
    w = torch.tensor([0.0, 2.0, 2.0, 3.0])
    target = guided_target(gen.model, x, t, c, w, 10)
    for i in range(3):  # the guided prediction, as a class-conditional teacher gives it in two calls
        assert torch.allclose(target[i], gen.conditioned(c[i : i + 1], float(w[i])).denoise(x[i : i + 1], t[i : i + 1])[0], atol=1e-5)
    assert torch.allclose(target[3], gen.denoise(x[3:], t[3:])[0], atol=1e-5)  # the null class: unconditional


def test_cfg_distill_gives_the_guided_prediction_in_one_call_per_step(teacher, tmp_path):
    root, cli = teacher
    cli.ok("distill", "--method", "cfg-distill", "-t", root / "t", "--data", "digits-images", "--out", tmp_path / "s",
           "--set", "steps=60", "--set", "diffusion.guidance_weights=[0,2]", *FAST, "-q")  # fmt: skip
    assert json.loads((tmp_path / "s" / "guidance.json").read_text()) == {"classes": 10, "weights": [0.0, 2.0]}
    student = load_generator(tmp_path / "s")
    from stages.diffusion.methods.cfg_distill import guided_target, widen

    gen = load_generator(root / "t")
    g = torch.Generator().manual_seed(3)
    x, t, c = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 1000, (64,), generator=g), torch.arange(64) % 10
    target = guided_target(gen.model, x, t, c, torch.full((64,), 2.0), 10)
    with torch.no_grad():
        err = {name: float(((m(x, t, class_labels=11 + c).sample - target) ** 2).mean())  # condition: weight 2, class c
               for name, m in (("start", widen(gen.model, 2).eval()), ("trained", student.model))}
    assert err["trained"] < err["start"]  # it learnt the guided prediction the teacher alone does not give
    calls = []
    student.model.register_forward_hook(lambda *a: calls.append(1))
    x = sample_generator(tmp_path / "s", 5, 3, 0, guidance=2.0)  # a fresh load: count on the loaded copy below
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
    from stages.diffusion.sampling import sample

    sample(student, [0, 1], 3, labels=torch.tensor([1, 2]), guidance=2.0)
    assert len(calls) == 3  # one network call per step; the teacher's CFG makes two
    with pytest.raises(DistilError, match="not one of them"):
        sample_generator(tmp_path / "s", 2, 1, 0, guidance=1.5)
    cli.fails("distill", "--method", "cfg-distill", "-t", tmp_path / "s", "--data", "digits-images", "--out", tmp_path / "s2",
              "--set", "steps=2", *FAST, match="already a cfg-distill student")  # fmt: skip
    plain = _folder(tmp_path, "plain", 0)
    cli.fails("distill", "--method", "cfg-distill", "-t", plain, "--data", "digits-images", "--out", tmp_path / "s3",
              "--set", "steps=2", *FAST, match="unconditional")  # fmt: skip


def test_evaluate_samples_a_cfg_distill_student_at_its_weights(teacher, tmp_path, clf):
    root, cli = teacher
    cli.ok("distill", "--method", "cfg-distill", "-t", root / "t", "--data", "digits-images", "--out", tmp_path / "s",
           "--set", "steps=2", "--set", "diffusion.guidance_weights=[2]", *FAST, "-q")  # fmt: skip
    cfg = EvaluateConfig(n_samples=20, time_samples=0, guidance=[2.0], step_counts=[2])
    out = evaluate_generators([root / "t", tmp_path / "s"], "digits-images", [2], cfg, tmp_path / "ev", classifier=clf)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"t+w2/steps_2", "s+w2/steps_2"} <= set(metrics)
    assert all(0 <= metrics[k]["class_accuracy"] <= 1 for k in ("t+w2/steps_2", "s+w2/steps_2"))


def test_the_diversity_term_is_a_similarity_the_student_can_lower(teacher):
    from stages.diffusion.methods.cfg_distill import diversity_penalty, widen

    root, _ = teacher
    gen = load_generator(root / "t")
    student = widen(gen.model, 2)
    y, gi = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 1, 0, 1, 0, 1])
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    values = []
    for _ in range(4):
        p = diversity_penalty(student, gen.schedule, torch.Size([1, 8, 8]), y, gi, 10, torch.Generator().manual_seed(0))
        values.append(float(p.detach()))
        opt.zero_grad()
        p.backward()
        opt.step()
    assert -1 <= values[0] <= 1 and values[-1] < values[0]


def test_merging_two_students_interpolates_their_weights_and_evaluate_scores_the_mix(teacher, tmp_path, clf):
    from stages.diffusion.generator import merge_generators

    root, cli = teacher
    for name, div in (("q", "0"), ("d", "1.0")):
        cli.ok("distill", "--method", "cfg-distill", "-t", root / "t", "--data", "digits-images", "--out", tmp_path / name,
               "--set", "steps=2", "--set", f"diffusion.diversity={div}", "--set", "diffusion.guidance_weights=[2]", *FAST, "-q")  # fmt: skip
    assert json.loads((tmp_path / "d" / "training.json").read_text())["diversity"] == 1.0
    a, b = load_generator(tmp_path / "q").model.state_dict(), load_generator(tmp_path / "d").model.state_dict()
    half = load_generator(merge_generators(tmp_path / "q", tmp_path / "d", 0.5, tmp_path / "m")).model.state_dict()
    key = next(k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k]))
    assert torch.allclose(half[key], (a[key] + b[key]) / 2)
    assert load_generator(tmp_path / "m").weights == (2.0,)
    cfg = EvaluateConfig(n_samples=20, time_samples=0, guidance=[2.0], step_counts=[2], merge=[str(tmp_path / "q"), str(tmp_path / "d")],
                         merge_alphas=[0.0, 0.5])  # fmt: skip
    out = evaluate_generators([tmp_path / "q"], "digits-images", [2], cfg, tmp_path / "ev", classifier=clf)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"q+d@0+w2/steps_2", "q+d@0.5+w2/steps_2"} <= set(metrics)
    assert metrics["q+d@0+w2/steps_2"]["class_accuracy"] == metrics["q+w2/steps_2"]["class_accuracy"]  # alpha 0 is A itself
    assert (out / "merged" / "q+d@0.5" / "model_index.json").is_file()
    with pytest.raises(DistilError, match="cannot be merged"):
        merge_generators(root / "t", tmp_path / "q", 0.5, tmp_path / "bad")


# ---- multi-student: one-step students for groups of classes -----------------------------


def test_class_groups_and_the_routing_by_class():
    from stages.diffusion.methods.multi_student import class_groups
    from stages.diffusion.models import ClassExperts

    assert class_groups(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for bad in (1, 11):
        with pytest.raises(DistilError, match="diffusion.students"):
            class_groups(10, bad)
    cfg = DiffusionConfig(width=8, depth=1)
    a, b = (build_denoiser(cfg, [2], seed, classes=4) for seed in (0, 1))
    experts = ClassExperts.of([a, b], [[0, 1], [2, 3]], 4)
    x, t, c = torch.randn(5, 2), torch.full((5,), 3), torch.tensor([0, 3, 1, 2, 4])  # 4: the null class
    with torch.no_grad():
        out = experts(x, t, class_labels=c).sample
        assert torch.allclose(out[[0, 2, 4]], a(x[[0, 2, 4]], t[:3], class_labels=c[[0, 2, 4]]).sample)
        assert torch.allclose(out[[1, 3]], b(x[[1, 3]], t[:2], class_labels=c[[1, 3]]).sample)


def test_consistency_distill_of_a_conditional_teacher_is_conditional(teacher, tmp_path):
    root, cli = teacher
    cli.ok("distill", "--method", "consistency-distill", "-t", root / "t", "--data", "digits-images", "--out", tmp_path / "cd",
           "--set", "steps=4", "--set", "diffusion.eval_samples=8", "--set", "diffusion.eval_steps=4", *FAST, "-q")  # fmt: skip
    student = load_generator(tmp_path / "cd")
    assert student.classes == 10 and student.kind == "consistency"
    a, b = sample_generator(tmp_path / "cd", 10, 1, 0, guidance=0.0), sample_generator(tmp_path / "cd", 10, 1, 0)
    assert a.shape == (10, 1, 8, 8) and not torch.allclose(a, b)  # classes 0..9 against the null class, same noise


def test_students_of_a_conditional_unet_teacher_probe_its_null_class(tmp_path):
    """diffusers' class-conditional U-Net refuses a call without class labels: the students'
    paired-error probe (no labels) must name the null class."""
    from conftest import Cli, write_params

    from stages.diffusion.students import net

    t = _folder(tmp_path, "t", 10)
    model = load_generator(t).model
    x, steps = torch.randn(3, 1, 8, 8), torch.full((3,), 5)
    with torch.no_grad():
        assert torch.equal(net(model)(x, steps), model(x, steps, class_labels=torch.full((3,), 10)).sample)
    cli = Cli(write_params(tmp_path, data={"limit": 64}))
    for method in ("consistency-distill", "multi-student"):
        cli.ok("distill", "--method", method, "-t", t, "--data", "digits-images", "--out", tmp_path / method, "--set", "steps=2",
               "--set", "diffusion.skip=5", "--set", "diffusion.eval_samples=4", "--set", "diffusion.eval_steps=4", *UNET, "-q")  # fmt: skip
        summary = json.loads((tmp_path / method / "training.json").read_text())
        assert load_generator(tmp_path / method).classes == 10 and summary["train_seconds"] > 0


def test_multi_student_trains_a_student_per_group_and_routes_by_class(teacher, tmp_path):
    root, cli = teacher
    cli.ok("distill", "--method", "multi-student", "-t", root / "t", "--data", "digits-images", "--out", tmp_path / "ms",
           *FAST, "--set", "diffusion.students=2", "--set", "diffusion.student_init=fresh", "--set", "diffusion.width=16",
           "--set", "steps=4", "--set", "diffusion.eval_samples=8", "--set", "diffusion.eval_steps=4", "-q")  # fmt: skip
    summary = json.loads((tmp_path / "ms" / "training.json").read_text())
    assert [s["classes"] for s in summary["students"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert summary["params_per_student"] < sum(p.numel() for p in load_generator(root / "t").model.parameters())
    gen = load_generator(tmp_path / "ms")
    assert gen.classes == 10 and len(gen.model.experts) == 2
    assert not any((tmp_path / "ms").glob("student-*"))  # the students' scratch is gone
    x = sample_generator(tmp_path / "ms", 10, 1, 0, guidance=0.0)
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    cli.fails("distill", "--method", "multi-student", "-t", _folder(tmp_path, "plain", 0), "--data", "digits-images",
              "--out", tmp_path / "bad", "--set", "steps=2", *FAST, match="class-conditional")  # fmt: skip
