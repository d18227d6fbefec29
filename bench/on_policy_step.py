"""Seconds per ``on-policy`` training step against TRL's ``DistillationTrainer`` on the same
models and settings, interleaved and repeated in one process (issue 19: goal <= 0.8x).

Both sides take the same step: sample a completion for each of ``BATCH`` prompts from the
student (temperature 1, the full distribution, ``max_new`` new tokens, KV cache: TRL through
``generate``, distil through its own loop, ``stages.lm.decode``), score it with the in-process
teacher, and minimise the generalised JSD (beta 0.5) on the completion tokens only, then one
AdamW update. distil's side is ``on_policy_loss`` with ``lmbda = 1`` (every batch on the
student's own samples, which is what TRL's trainer always does) through the fused, chunked
path; TRL's is ``DistillationTrainer.training_step`` plus its optimizer step, in float32
without gradient checkpointing (TRL's defaults, bf16 and checkpointing, would not be the same
step). Teacher and student are random tiny Llamas built from a config on a tokenizer trained
on the task's text; a random model rarely samples eos, so nearly every completion runs to
``max_new`` tokens on both sides (the tokens each side generated are reported).

Each round runs one step of each, in a rotated order; the ratio per round is distil's time
over TRL's, reported as the median with its spread (min, max) over rounds.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable

import torch

from bench.harness import interleaved, ratios
from stages.lm.models import LMSize, build_lm, train_tokenizer
from stages.tasks.reasoning import ReasoningTask

BATCH, STUDENT, TEACHER = 8, LMSize(hidden=64, layers=2, heads=4, context=128), LMSize(hidden=128, layers=4, heads=4, context=128)


def models() -> tuple[object, object, object, list[str]]:
    """(student, teacher, tokenizer, prompts): random tiny Llamas on a tokenizer of the chain_sum task."""
    rows = ReasoningTask("chain_sum", sizes=(200, 10, 10)).table().to_pylist()
    tok = train_tokenizer([r["prompt"] + " " + r["answer"] for r in rows], vocab_size=1000)
    torch.manual_seed(0)
    student, teacher = build_lm("llama", STUDENT, tok), build_lm("llama", TEACHER, tok).eval()
    return student, teacher, tok, [r["prompt"] for r in rows[:BATCH]]


def distil_step(student, teacher, tok, prompts: list[str], max_new: int) -> tuple[Callable[[], None], Callable[[], int]]:
    """One ``on-policy`` step of distil, and how many tokens its last sampling generated."""
    from stages.config import DistillConfig, LMConfig
    from stages.lm.methods import LM_METHODS
    from stages.lm.methods.on_policy import on_policy_loss
    from stages.lm.teachers.transformers_backend import TransformersTeacher
    from stages.lm.training import IGNORE, collate

    cfg = DistillConfig(method="on-policy", lmbda=1.0, beta=0.5, lm=LMConfig(max_new_tokens=max_new))
    live = TransformersTeacher("teacher", "cpu", model=teacher, tokenizer=tok)
    loss_fn = on_policy_loss(LM_METHODS["on-policy"], cfg, live, tok, max_len=128)
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    batch = collate([(p + [tok.eos_token_id], [IGNORE] * len(p) + [tok.eos_token_id]) for p in ids], tok.pad_token_id)
    batch["w"] = torch.ones(len(ids))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    seen = {"tokens": 0}

    def step():
        student.train()
        with _counting(seen):
            loss = loss_fn(student, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step, lambda: seen["tokens"]


@contextlib.contextmanager
def _counting(seen: dict):
    """Record in ``seen["tokens"]`` the new tokens (pad excluded) distil's sampling loop produces meanwhile."""
    from stages.lm import generation

    inner = generation.sample_tokens

    def counted(model, input_ids, attention_mask, **kw):
        out = inner(model, input_ids, attention_mask, **kw)
        seen["tokens"] = int((out != kw["pad_token_id"]).sum())
        return out

    generation.sample_tokens = counted
    try:
        yield
    finally:
        generation.sample_tokens = inner


def _last_tokens(model) -> int:
    """Tokens the model's latest ``generate`` produced (TRL's side; recorded by the wrapper ``_count_generate`` installs)."""
    return getattr(model, "_bench_generated", 0)


def _count_generate(model) -> None:
    """Wrap ``model.generate`` to record how many new tokens (pad excluded) its latest call produced."""
    inner = model.generate

    def generate(*args, **kwargs):
        out = inner(*args, **kwargs)
        width = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
        pad = kwargs.get("pad_token_id", model.generation_config.pad_token_id)
        model._bench_generated = int((out[:, width:] != pad).sum())
        return out

    model.generate = generate


def trl_step(student, teacher, tok, prompts: list[str], max_new: int) -> tuple[Callable[[], None], Callable[[], int]]:
    """One ``DistillationTrainer`` step (generation, chunked JSD on completion tokens, backward) and its optimizer step."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import tempfile

    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tok = copy.deepcopy(tok)
    tok.padding_side = "left"
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=BATCH, max_completion_length=max_new,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.5, learning_rate=1e-4, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, report_to=[], logging_steps=10**9, save_strategy="no",
        disable_dropout=True, seed=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                                      train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))  # fmt: skip
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what ``train`` sets before its first step
    batch = [{"prompt": p} for p in prompts]

    def step():
        trainer.training_step(trainer.model, batch, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return step, lambda: _last_tokens(trainer.model)


def compare(max_new: int, rounds: int) -> dict:
    """distil's on-policy step over TRL's, at ``max_new`` new tokens per completion."""
    student, teacher, tok, prompts = models()
    ours, theirs = copy.deepcopy(student), copy.deepcopy(student)
    _count_generate(theirs)
    steps = {"distil": distil_step(ours, teacher, tok, prompts, max_new), "trl": trl_step(theirs, teacher, tok, prompts, max_new)}
    timed = ratios(interleaved({n: s[0] for n, s in steps.items()}, rounds), "trl")
    return {"max_new_tokens": max_new, "batch": BATCH, "rounds": rounds, "distil_over_trl": timed["distil"]["ratio"],
            "spread": timed["distil"]["spread"], "seconds": {n: t["seconds"] for n, t in timed.items()},
            "generated_tokens_last_step": {n: s[1]() for n, s in steps.items()}}  # fmt: skip


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True
