"""`distil generate-teacher-data` for generators: samples and their sampling trajectories.

Sample i starts from noise seeded ``seed + i`` and runs the model's sampler for ``steps``
steps (a diffusion teacher: the ``solver`` ODE; a consistency student: multistep
consistency sampling, optionally after a ``hybrid_first_step`` teacher step). Stored per
sample: the noise (step 0), the state after every ``save_every``-th step, and the final
sample (timestep -1), in ``_states/shard-NNNNN.safetensors`` files of ``shard_samples``
samples indexed by ``part-NNNNN.parquet`` (``artifacts.DIFFUSION_TEACHER_DATA``; the
leading underscore keeps Parquet directory readers out of the shards). A shard is
written before its index part, both atomically, and a rerun resumes after the last
complete part, so a killed run finishes without duplicates or gaps. ``stages.diffusion.data``
reads the folder back (``read_trajectories``, ``read_final_samples``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from stages.artifacts import (
    DIFFUSION_TEACHER_DATA,
    Kind,
    Output,
    TableWriter,
    fingerprint,
    save_tensors,
    write_manifest,
)
from stages.config import DataConfig, GenerateTeacherDataConfig, to_dict
from stages.devices import resolve_device
from stages.diffusion.data import STATES, generator_identity, load_generator_data
from stages.diffusion.generator import check_same_shape, load_generator
from stages.diffusion.sampling import check_hybrid, check_sampling, consistency_timesteps, ode_timesteps, sample
from stages.errors import DistilError
from stages.modality import DIFFUSION, of_data
from stages.progress import progress_bar


def _kept_steps(steps: int, save_every: int) -> list[int]:
    return [0] + ([i for i in range(1, steps) if i % save_every == 0] if save_every > 0 else [])


def run(
    cfg: GenerateTeacherDataConfig,
    teacher: Path | list[Path],
    data: str | Path,
    out: Path,
    *,
    data_cfg: DataConfig,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if len(teachers) != 1:
        raise DistilError(f"generator teacher data comes from one --teacher, got {len(teachers)}")
    check_sampling(cfg.steps, cfg.solver)
    if cfg.noise_samples < 1 or cfg.shard_samples < 1 or cfg.batch_size < 1 or cfg.save_every < 0:
        raise DistilError("noise_samples, shard_samples and batch_size must be positive and save_every >= 0")
    if of_data(data, data_cfg) != DIFFUSION:
        raise DistilError(f"--data '{data}' is not generator data; pass the data the teacher was trained on (e.g. moons)")
    dev = resolve_device(device)
    gen = load_generator(teachers[0], dev, "teacher")
    if gen.kind == "flow-map":
        raise DistilError(f"teacher {teachers[0]} is a flow map, with no diffusion ODE whose trajectories students read; "
                          "use a diffusion teacher (distill --method denoise) or a consistency student")  # fmt: skip
    hybrid = load_generator(cfg.hybrid_first_step, dev, "hybrid teacher") if cfg.hybrid_first_step else None
    check_hybrid(gen, hybrid, cfg.steps)
    gdata = load_generator_data(data, data_cfg)
    check_same_shape(gen.sample_shape, gdata.sample_shape, f"teacher {teachers[0]}", f"data {data}")
    grid = consistency_timesteps(gen, cfg.steps) if gen.kind == "consistency" else ode_timesteps(gen.schedule.T, cfg.steps)
    kept = _kept_steps(cfg.steps, cfg.save_every)
    per_sample = len(kept) + 1

    params = {"generate_teacher_data": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"teacher": gen.identity()["sha256"], "data": generator_identity(data),
              "hybrid_first_step": hybrid.identity()["sha256"] if hybrid else ""}  # fmt: skip
    output = Output(out, fingerprint("generate_teacher_data", params, inputs))
    with output as work:
        writer = TableWriter(work, DIFFUSION_TEACHER_DATA)
        (work / STATES).mkdir(exist_ok=True)
        start = writer.done_rows // per_sample
        t0 = time.perf_counter()
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{gen.kind} samples", total=cfg.noise_samples, completed=start, info="samples")
            for lo in range(start, cfg.noise_samples, cfg.shard_samples):
                hi = min(lo + cfg.shard_samples, cfg.noise_samples)
                states, index = _shard(gen, hybrid, cfg, lo, hi, kept, len(writer.parts))
                save_tensors(work / STATES / f"shard-{len(writer.parts):05d}.safetensors", {"states": states})
                writer.write(index)
                bar.update(task, completed=hi)
        seconds = time.perf_counter() - t0
        write_manifest(
            work, kind=Kind.DIFFUSION_TEACHER_DATA, params=params, inputs=inputs, rows=writer.done_rows,
            model={**gen.identity(), "hybrid_first_step": hybrid.identity() if hybrid else None},
            extra={"data": gdata.describe(), "sample_shape": gen.sample_shape, "samples": cfg.noise_samples,
                   "sampling": {"steps": cfg.steps, "solver": cfg.solver if gen.kind == "diffusion" else "consistency",
                                "timesteps": grid, "kept_steps": kept, "seed": cfg.seed},
                   "shards": sorted(f"{STATES}/{p.name}" for p in (work / STATES).glob("shard-*.safetensors")),
                   "samples_per_second": (cfg.noise_samples - start) / max(seconds, 1e-9)},
        )  # fmt: skip
        return output.commit()


def _recorder(into: dict, kept: list[int]):
    def record(step: int, timestep: int, x: torch.Tensor) -> None:
        if step in kept:
            into[step] = (timestep, x.float().cpu())

    return record


@torch.no_grad()
def _shard(gen, hybrid, cfg: GenerateTeacherDataConfig, lo: int, hi: int, kept: list[int], shard: int):
    """States [rows, *shape] of samples lo..hi-1 (sample-major: kept steps, then the final
    sample) and their index table."""
    chunks = []
    for b in range(lo, hi, cfg.batch_size):
        seeds = [cfg.seed + i for i in range(b, min(b + cfg.batch_size, hi))]
        recorded: dict[int, tuple[int, torch.Tensor]] = {}
        record = _recorder(recorded, kept)
        final = sample(gen, seeds, cfg.steps, solver=cfg.solver, hybrid=hybrid, record=record).float().cpu()
        if not torch.isfinite(final).all():
            raise DistilError(f"teacher {gen.path} produced NaN/inf samples; the checkpoint is broken, retrain it")
        per = [(s, *recorded[s]) for s in kept] + [(cfg.steps, -1, final)]
        stack = torch.stack([x for _, _, x in per], dim=1)  # [B, kept + 1, *shape]
        chunks.append((seeds, per, stack))
    states = torch.cat([c[2] for c in chunks]).flatten(0, 1)
    steps = [(s, t) for _, per, _ in chunks[:1] for s, t, _ in per]
    n = hi - lo
    index = {
        "sample": np.repeat(np.arange(lo, hi), len(steps)),
        "seed": np.repeat(np.asarray([cfg.seed + i for i in range(lo, hi)]), len(steps)),
        "step": np.tile([s for s, _ in steps], n).astype(np.int32),
        "timestep": np.tile([t for _, t in steps], n).astype(np.int32),
        "shard": np.full(n * len(steps), shard, np.int32),
        "offset": np.arange(n * len(steps)),
    }
    return states, pa.table(index)
