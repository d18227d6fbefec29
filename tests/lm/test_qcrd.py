"""``qcrd``: self-consistent positives, negatives from an earlier student with right answers
dropped, the margin term that stops at delta, a discriminator that learns to tell the two apart,
and the method through the CLI on teacher data (refused on gold answers)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import stages.lm.methods.qcrd as qcrd
from stages.config import DistillConfig, LMConfig, QCRDConfig
from stages.lm.models import LMSize, build_lm, train_tokenizer
from stages.lm.training import IGNORE, collate, encode

SUMS = [(1, 2), (3, 4), (5, 1)]
TEXTS = [f"Question: {a} + {b} =\nAnswer: {a + b}" for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def _setup(tok, **q):
    torch.manual_seed(0)
    model = build_lm("llama", LMSize(hidden=16, layers=1, heads=2, intermediate=32, context=32), tok).train()
    cfg = DistillConfig(method="qcrd", seed=0, lm=LMConfig(max_new_tokens=3), qcrd=QCRDConfig(**q))
    rows = [encode(tok, f"Question: {a} + {b} =\nAnswer:", str(a + b), 32) for a, b in SUMS]
    return model, cfg, collate([(i, y, None, None, 1.0) for i, y in rows], tok.pad_token_id)


def _negatives_answering(tok, monkeypatch, offset: int):
    """The older student's samples, scripted: each prompt's sum + ``offset``, then eos."""

    def fake(model, tokenizer, prompts, **kw):
        return [tok(f" {a + b + offset}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a, b in SUMS]

    monkeypatch.setattr(qcrd, "sample_continuations", fake)


def _ce(model, b) -> torch.Tensor:
    """Mean CE per completion token of each row."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    keep = b["labels"][:, 1:] != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, b["labels"][:, 1:].clamp_min(0)[..., None]).squeeze(-1)
    return -(lp * keep).sum(1) / keep.sum(1)


def test_a_negative_with_the_positive_answer_is_dropped_a_wrong_one_kept(tok, monkeypatch):
    for offset, kept in ((0, 0.0), (1, 1.0)):
        model, cfg, b = _setup(tok)
        _negatives_answering(tok, monkeypatch, offset)
        loss_fn = qcrd.QCRDLoss(cfg, tok, 32)
        loss_fn(model, b)
        assert loss_fn.summary()["qcrd_negatives_per_positive"] == kept


def test_the_margin_term_pushes_a_negative_down_only_until_its_ce_reaches_delta(tok, monkeypatch):
    _negatives_answering(tok, monkeypatch, 1)
    losses = {}
    for weight, margin in ((0.0, 3.0), (0.5, 1e-6), (0.5, 50.0)):
        model, cfg, b = _setup(tok, weight=weight, margin=margin)
        losses[(weight, margin)] = float(qcrd.QCRDLoss(cfg, tok, 32)(model, b).detach())
    assert losses[(0.5, 1e-6)] == pytest.approx(losses[(0.0, 3.0)], abs=1e-6)  # every negative's CE is above delta: no push
    assert losses[(0.5, 50.0)] > losses[(0.0, 3.0)] + 0.1

    after = {}
    for weight in (0.0, 2.0):  # one step each from the same start: the margin term raises the negatives' CE
        model, cfg, b = _setup(tok, weight=weight, margin=50.0)
        loss_fn = qcrd.QCRDLoss(cfg, tok, 32)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn(model, b).backward()
        opt.step()
        neg = collate([(p + [t], [IGNORE] * len(p) + [t]) for p, t in _wrong_rows(tok, b)], tok.pad_token_id)
        with torch.no_grad():
            after[weight] = float(_ce(model, neg).mean())
    assert after[2.0] > after[0.0]


def _wrong_rows(tok, b):
    prompts = []
    for row, lab in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True):
        prompts.append(row[: next(i for i, v in enumerate(lab) if v != IGNORE)])
    return [(p, tok(f" {a + s + 1}", add_special_tokens=False)["input_ids"][0]) for p, (a, s) in zip(prompts, SUMS, strict=True)]


def test_the_discriminator_learns_to_rate_positives_above_negatives(tok, monkeypatch):
    _negatives_answering(tok, monkeypatch, 3)
    model, cfg, b = _setup(tok)
    loss_fn = qcrd.QCRDLoss(cfg, tok, 32)
    for _ in range(150):  # the student stays as it is; only the discriminator learns
        loss_fn(model, b)
    s = loss_fn.summary()
    assert s["qcrd_score_positive_last"] > 0.6 > 0.4 > s["qcrd_score_negative_last"]


def test_positives_are_the_self_consistent_samples(tmp_path):
    rows = [{"id": i, "prompt_id": p, "answer": a, "split": "train"}
            for i, (p, a) in enumerate([(0, "5"), (0, "5"), (0, "6"), (1, None), (1, None), (2, "7")])]  # fmt: skip
    f = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    loader, count = qcrd.qcrd_rows(lambda f, split: lambda: [r for r in pq.read_table(f).to_pylist() if r["split"] == split],
                                   [f], tmp_path)  # fmt: skip
    assert [r["id"] for r in loader(f, "train")()] == [0, 1, 5] and count(f, "train") == 3 and count(f, "dev") == 0


@pytest.fixture(scope="module")
def teacher_data(tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("qcrd")
    cli = Cli(write_params(root))
    small = ["--set", "data.sizes=[60,10,10]", "--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2",
             "--set", "lm.vocab_size=320", "--set", "batch_size=16", "--set", "lr=0.01", "-q"]  # fmt: skip
    cli.ok("distill", "--method", "sft", "--data", "chain_sum", "--out", root / "t", "--set", "epochs=4", *small)
    cli.ok("generate-teacher-data", "--teacher", root / "t", "--data", "chain_sum", "--out", root / "td", "--set", "samples=3",
           "--set", "temperature=0.7", "--set", "max_new_tokens=4", "--set", "data.sizes=[60,10,10]", "--set", "splits=[train,dev]")  # fmt: skip
    return root, cli, small


def test_qcrd_trains_on_teacher_data_and_reports_its_contrast(teacher_data):
    root, cli, small = teacher_data
    cli.ok("distill", "--method", "qcrd", "--data", root / "td", "--out", root / "s", "--set", "epochs=2",
           "--set", "qcrd.lag=2", "--set", "lm.max_new_tokens=4", *small)  # fmt: skip
    summary = json.loads((root / "s" / "training.json").read_text())
    assert 0 < summary["qcrd_negatives_per_positive"] <= 1 and summary["qcrd_negative_ce_last"] > 0
    table = pq.read_table(root / "td").to_pylist()
    assert summary["train_rows"] < sum(r["split"] == "train" for r in table)  # the inconsistent samples are not positives


def test_qcrd_on_gold_answers_or_with_a_bad_setting_is_refused(teacher_data, tmp_path):
    root, cli, small = teacher_data
    cli.fails("distill", "--method", "qcrd", "--data", "chain_sum", "--out", tmp_path / "s", *small, match="teacher data")
    cli.fails("distill", "--method", "qcrd", "--data", root / "td", "--out", tmp_path / "s", "--set", "qcrd.lag=0", *small,
              match="qcrd.lag")  # fmt: skip
    assert not (tmp_path / "s").exists()
