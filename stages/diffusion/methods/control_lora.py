"""``distill --method control-lora``: a LoRA adapter that makes a diffusion teacher draw one class,
for transfer, unchanged, onto its distilled students.

Gandikota & Bau, "Distilling Diversity and Control in Diffusion Models" (2025), section 4 (control
distillation): a distilled model keeps its base model's concept representations, so a control
mechanism trained on the base (their LoRAs and Concept Sliders) steers the distilled model too,
without retraining. Here the control is a class: a LoRA (Hu et al. 2021: W + (alpha / r) B A on
every linear and convolution layer of the network, through ``peft``) is fitted to an unconditional
teacher with its own denoising loss (``denoise``'s, Ho et al. 2020) on the train images of
``diffusion.control_class`` alone, rank ``diffusion.control_rank``, the base weights frozen.

The output is the teacher with the adapter merged (a generator folder like any other, so
``evaluate`` scores it) and the adapter itself in PEFT's format under ``control/`` (with
``CONTROL``: its class and base), which ``evaluate --set control=DIR`` applies unchanged to every
model it scores (``stages.diffusion.control.apply_control``): the share of samples of the class,
with and without it, measures how much control survives distillation.
"""

from __future__ import annotations

import copy

import torch

from stages.artifacts import write_json
from stages.config import DistillConfig
from stages.diffusion.control import ADAPTER, CONTROL, public_config
from stages.diffusion.data import GeneratorData
from stages.diffusion.methods.denoise import denoise_loss
from stages.diffusion.students import load_teacher
from stages.diffusion.training import EMA, fit
from stages.errors import DistilError


def adapted_layers(model: torch.nn.Module) -> list[str]:
    """The names of every linear and convolution layer of a denoiser (the LoRA's target modules)."""
    return [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(the teacher with the adapter merged, the teacher's scheduler, summary); the adapter in ``work/control``."""
    from peft import LoraConfig, get_peft_model

    teacher = load_teacher(teacher_path, data, device, "control-lora", unconditional=True)
    d = cfg.diffusion
    labels = data.labels.get("train")
    if labels is None:
        raise DistilError(f"control-lora learns the images of one class: {data.name} has no labels (use digits-images)")
    present = sorted({int(v) for v in labels})
    if d.control_class not in present:
        raise DistilError(f"diffusion.control_class {d.control_class} is not a class of {data.name}'s train split ({present})")
    rows = data.split("train")[torch.as_tensor(labels == d.control_class)]
    model = copy.deepcopy(teacher.model).requires_grad_(False)
    lora = LoraConfig(r=d.control_rank, lora_alpha=d.control_rank, lora_dropout=0.0, target_modules=adapted_layers(model))
    adapted = get_peft_model(model, lora)
    ema = EMA(adapted, d.ema, warmup=True)
    progress = fit(adapted, ema, rows, cfg, work, denoise_loss(teacher.schedule), device=device, label="control-lora",
                   bar=bar, live=live)  # fmt: skip
    ema.model.save_pretrained(work / ADAPTER)
    trained = sum(p.numel() for n, p in ema.model.named_parameters() if "lora_" in n)
    write_json(work / CONTROL, {"class": d.control_class, "rank": d.control_rank, "base": teacher.identity(),
                                "base_config": public_config(teacher.model), "network": type(teacher.model).__name__})  # fmt: skip
    summary = {"teacher": teacher.identity(), "control_class": d.control_class, "control_rank": d.control_rank,
               "class_rows": len(rows), "adapter_params": trained, "adapted_layers": len(lora.target_modules),
               "epochs": progress["epoch"], "train_seconds": progress["seconds"], "history": progress["history"]}  # fmt: skip
    return ema.model.merge_and_unload(), teacher.scheduler, summary
