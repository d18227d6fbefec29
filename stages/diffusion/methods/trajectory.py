"""``distill --method trajectory``: image-free consistency distillation from the teacher's
own sampling trajectories.

TBCM, the Trajectory-Backward Consistency Model ("Image-Free Timestep Distillation via
Continuous-Time Consistency with Trajectory-Sampled Pairs", 2025; github.com/hustvl/TBCM),
extracts its training states from the teacher's generation trajectories instead of noising training
images, so no image ever enters distillation and the states the student learns from are
the ones it meets when sampling. Here the trajectories are ``generate-teacher-data``'s
(``stages.diffusion.teacher_data``: the noise, the state after every ``save_every``-th ODE
step and the final sample, per seeded noise), and the continuous-time objective becomes
its discrete pair form (Song et al. 2023, "Consistency Models", eq. 7, with the ODE step
read off the stored trajectory instead of solved):

1. a trajectory; a stored state a ~ U over its non-final states, and b ~ U over the
   states after it, the final sample included (t_b < t_a on the same ODE trajectory);
2. loss d(f_theta(x_{t_a}, t_a), f_theta^-(x_{t_b}, t_b)), where f_theta^-(x, -1) = x: the
   trajectory's final sample is its own target (the boundary condition);
3. theta^- <- mu theta^- + (1 - mu) theta (``target_ema``); f in LCM's parameterisation
   (``sampling.consistency_fn``: c_skip, c_out with ``timestep_scaling``).

``--data`` must be that trajectory folder, made by the ``--teacher`` given here (its
content hash is checked): the method never reads a dataset, and refuses one. The stored
timesteps must be an even grid of n >= 2 points ending at T - 1 (``generate-teacher-data
--steps N`` with N dividing T, ``save_every`` dividing N), which becomes the student's
``LCMScheduler`` grid (``original_inference_steps`` = n), so every timestep it is
sampled at was trained on. The teacher network is not run during training, only once
for the paired-error reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData, read_trajectories
from stages.diffusion.sampling import consistency_fn
from stages.diffusion.students import Probe, averages, check_student, init_student, load_teacher, net, student_scheduler
from stages.diffusion.training import fit
from stages.errors import DistilError
from stages.losses.consistency import CONSISTENCY_LOSSES

IMAGE_FREE = (
    "method 'trajectory' is image-free: it learns from a diffusion teacher's trajectories only; "
    "--data must be generate-teacher-data output of that teacher"
)


def load_trajectories(path: Path, teacher_hash: str, T: int) -> tuple[list[int], torch.Tensor]:
    """(timesteps [n + 1] ending with -1, states [samples, n + 1, *shape]) of the trajectory
    folder ``path``, checked against the teacher and the LCM grid."""
    table, states, manifest = read_trajectories(path)
    model = manifest.get("model") or {}
    if model.get("kind") != "diffusion" or model.get("hybrid_first_step"):
        raise DistilError(
            f"{path} holds samples of a consistency sampler (re-noised between steps), not ODE trajectories; "
            "make them with generate-teacher-data -t <diffusion teacher>"
        )
    if model.get("sha256") != teacher_hash:
        raise DistilError(f"the trajectories in {path} come from another model ({model.get('path')}) than --teacher; "
                          "pass the teacher that generated them")  # fmt: skip
    sample, step = table.column("sample").to_numpy(), table.column("step").to_numpy()
    order = np.lexsort((step, sample))
    n_samples = len(np.unique(sample))
    if n_samples == 0 or len(order) % n_samples:
        raise DistilError(f"{path}: trajectories of unequal length; regenerate the teacher data")
    timesteps = table.column("timestep").to_numpy()[order].reshape(n_samples, -1)
    if not (timesteps == timesteps[0]).all():
        raise DistilError(f"{path}: trajectories stored at different timesteps; regenerate the teacher data")
    grid = [int(t) for t in timesteps[0]]
    n = len(grid) - 1
    even = n >= 2 and T % n == 0 and grid[:-1] == [(n - i) * (T // n) - 1 for i in range(n)]
    if not even:
        raise DistilError(
            f"{path} stores its trajectories at timesteps {grid}; trajectory needs an even grid of at least 2 timesteps "
            f"ending at {T - 1} (generate-teacher-data --steps N with N dividing {T} and save_every >= 1 dividing N)"
        )
    x = states[torch.from_numpy(order)].reshape(n_samples, n + 1, *states.shape[1:])
    return grid, x


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(student to save, its LCMScheduler, summary)."""
    path = data.meta.get("teacher_data")
    if path is None:
        raise DistilError(f"{IMAGE_FREE}, got '{data.name}'")
    teacher = load_teacher(teacher_path, data, device, "trajectory")
    schedule, d = teacher.schedule, cfg.diffusion
    check_student(cfg)
    grid, trajectories = load_trajectories(Path(path), teacher.identity()["sha256"], schedule.T)
    n = len(grid) - 1
    ts = torch.tensor(grid)
    student = init_student(cfg, teacher, data, device)
    target, sampler = averages(cfg, student)
    saved = sampler or target
    scaling, distance = d.timestep_scaling, CONSISTENCY_LOSSES[d.loss]

    def loss(model, traj: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        rows = torch.arange(len(traj))
        a = torch.randint(0, n, (len(traj),), generator=g)
        b = a + 1 + (torch.rand(len(traj), generator=g) * (n - a)).long()
        with torch.no_grad():
            y = consistency_fn(net(target.model), schedule, traj[rows, b], ts[b].clamp_min(0), scaling)
        return distance(consistency_fn(net(model), schedule, traj[rows, a], ts[a], scaling), y, d.huber_c)

    probe = Probe(teacher, cfg, device)
    top = torch.full((len(probe.z),), grid[0], dtype=torch.long)

    @torch.no_grad()
    def paired_error(epoch: int | None = None) -> dict[str, float]:
        return {"paired_error": probe(consistency_fn(net(saved.model), schedule, probe.z, top, scaling))}

    initial = paired_error()["paired_error"]
    progress = fit(student, target, trajectories, cfg, work, loss, device=device, label="trajectory", bar=bar, live=live,
                   on_epoch=paired_error, sampler=sampler)  # fmt: skip
    history = progress["history"]
    summary = {
        "teacher": teacher.identity(), "trajectories": str(path), "trajectory_count": len(trajectories),
        "timesteps": grid, "grid_points": n, "loss": d.loss, "target_ema": d.target_ema, "sample_ema": d.sample_ema, "student_init": d.student_init,
        "epochs": progress["epoch"], "train_seconds": progress["seconds"], "paired_error_initial": initial,
        "paired_error_final": history[-1]["paired_error"] if history else initial,
        "paired_error_teacher_1step": probe.teacher_error(1), "paired_error_reference_steps": d.eval_steps,
        "history": history,
    }  # fmt: skip
    return saved.model, student_scheduler(teacher.scheduler, n, scaling), summary
