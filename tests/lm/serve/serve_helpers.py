"""What the `distil serve` tests share: a tiny random LM written to disk (built once per
session), its in-process engine, and engine wrappers (slow, cascade-like) for the tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stages.config import ServeConfig, TeacherConfig
from stages.errors import DistilError

TEXTS = [f"Question: {a} + {b}\nAnswer: {a + b}" for a in range(12) for b in range(12)]


def tiny_lm(tmp_path_factory) -> Path:
    """A 1-layer Llama with a 300-token BPE tokenizer, saved with save_pretrained. Its weights
    are drawn wide (std 0.3), so that its greedy answers differ from prompt to prompt (at the
    default init every prompt gets the same answer, and a mixed-up batch would go unseen)."""
    from stages.lm.models import LMSize, build_lm, draw_wide, train_tokenizer

    path = tmp_path_factory.getbasetemp() / "serve_tiny_lm"
    if not (path / "config.json").exists():
        tok = train_tokenizer(TEXTS, vocab_size=300)
        model = draw_wide(build_lm("llama", LMSize(hidden=32, layers=1, heads=2, context=64), tok, seed=3), 0.3, seed=0)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The tiny LM's in-process engine (import it into a test module to use it)."""
    return open_engine(tiny_lm(tmp_path_factory))


def open_engine(path: Path):
    import torch

    from stages.lm.teachers import open_teacher

    return open_teacher(path, TeacherConfig(), torch.device("cpu"))


def classifier_dir(root: Path) -> Path:
    """A folder of what of_model calls a classifier (its config names an arch, no model_type)."""
    path = root / "classifier"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"arch": "mlp", "width": 8}))
    return path


def serve_config(**changes) -> ServeConfig:
    return ServeConfig(**{"batch_wait_ms": 1.0, **changes})


class Wrapped:
    """An engine that delegates to ``inner``; subclasses change one call."""

    def __init__(self, inner):
        self.inner = inner
        self.identity, self.tokenizer, self.context = inner.identity, inner.tokenizer, inner.context

    def generate(self, prompts, n, sampling):
        return self.inner.generate(prompts, n, sampling)

    def score(self, prompt_ids, completion_ids, top_k):
        return self.inner.score(prompt_ids, completion_ids, top_k)

    def close(self) -> None:
        pass


class Slow(Wrapped):
    """generate sleeps ``seconds`` first; ``started`` counts the calls begun."""

    def __init__(self, inner, seconds: float):
        super().__init__(inner)
        self.seconds, self.started = seconds, 0

    def generate(self, prompts, n, sampling):
        self.started += 1
        time.sleep(self.seconds)
        return super().generate(prompts, n, sampling)


class CascadeLike(Wrapped):
    """What a cascade engine looks like to the server: completions carry extra["distil"], score refuses."""

    def generate(self, prompts, n, sampling):
        rows = super().generate(prompts, n, sampling)
        for row in rows:
            row.extra["distil"] = {"route": "student", "cost": 1.5}
        return rows

    def score(self, prompt_ids, completion_ids, top_k):
        raise DistilError("a cascade cannot score given tokens; score with the student or the teacher directly")
