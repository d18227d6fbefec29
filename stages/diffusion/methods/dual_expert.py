"""``distill --method dual-expert``: two multistep consistency experts split by timestep.

Dual-Expert Consistency Model (Lv et al., "DCM: Dual-Expert Consistency Model for Efficient and
High-Quality Video Generation", 2025): the steps of a few-step sampler near pure noise decide
semantics and layout, the late ones details, and one network serving both compromises; DCM
gives each part its own expert. Here the training is ``multistep``'s segmented consistency
distillation (``stages.diffusion.methods.multistep``: ``diffusion.segments`` segments, each
point mapped to its segment's start, DDIM sampling along the boundaries), with the network a
``TimestepExperts``: the semantic expert serves the segments above the middle boundary
e_{s // 2}, the detail expert the ones below, both started from the teacher. DCM's extra losses
(a temporal coherence loss for the semantic expert, GAN and feature matching for the detail one)
are not part of it: both experts learn the consistency loss alone. It needs at least 2 segments.
"""

from __future__ import annotations

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.methods import multistep
from stages.diffusion.models import TimestepExperts
from stages.errors import DistilError


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(the two experts as one network, their DDIMScheduler, summary with the split)."""
    if cfg.diffusion.segments < 2:
        raise DistilError(f"dual-expert splits the segments between two experts: set diffusion.segments >= 2, got {cfg.diffusion.segments}")
    split = {}

    def make(teacher, bounds: list[int]):
        split["t"] = bounds[len(bounds) // 2]
        if teacher.classes:
            raise DistilError(f"dual-expert distils an unconditional teacher; {teacher.path} is class-conditional")
        return TimestepExperts.of(teacher.model, [split["t"]]).train().requires_grad_(True)

    model, scheduler, summary = multistep.train(cfg, data, teacher_path, work, device=device, bar=bar, live=live,
                                                method="dual-expert", make_student=make)  # fmt: skip
    return model, scheduler, {**summary, "expert_split": split["t"]}
