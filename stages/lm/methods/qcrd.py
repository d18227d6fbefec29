"""The loss of ``distil distill --method qcrd``: quality-guided contrastive rationale distillation
(Wang et al., "QCRD: Quality-guided Contrastive Rationale Distillation for Large Language Models",
2024, section 3).

- **Positives**: teacher samples denoised by self-consistency, the samples whose answer is
  their prompt's majority answer (``stages.lm.selectors.majority``; ``qcrd_rows`` applies it, so
  data already selected ``--by majority`` passes unchanged).
- **Negatives**: per prompt of the batch, one completion sampled at ``qcrd.temperature`` (the
  paper: 1.5) by an earlier copy of the student, ``qcrd.lag`` to 2 x ``lag`` optimiser steps
  old (the paper: the model of 5 iterations before). A negative that reaches the positive's
  answer is dropped: it is not a wrong rationale (our choice; the paper leaves that to the
  discriminator).
- **Contrastive loss** (section 3.3): CE on the positives, and on each negative the margin
  term min(CE(neg) - delta, 0), which pushes its likelihood down until its CE reaches delta
  (``qcrd.margin``, the paper's delta = 3) and no further, with weight beta (``qcrd.weight``,
  the paper's 0.2): L = sum_i s_i CE(pos_i) / sum_i s_i - beta mean_j (1 - s_j) min(CE(neg_j) - delta, 0).
  With one positive per prompt the paper's minimum over a prompt's positives is that one.
- **Quality scores** s from an online discriminator (section 3.3): the paper's is a T5
  encoder with max pooling and two linear layers; ours reads the student's own last hidden
  states, detached, max-pooled over the completion, through two linear layers, and is trained
  each step with binary cross-entropy (positives 1, negatives 0). A positive it rates highly
  counts more, a negative it rates highly (one that looks right) pushes less. Its scores are
  taken before its update; it starts untrained (s near 1/2 for all), where the paper
  pre-trains it for 500 steps on augmented teacher rationales.
"""

from __future__ import annotations

import copy

import torch

from stages.errors import DistilError
from stages.lm.generation import sample_continuations
from stages.lm.training import IGNORE, collate
from stages.losses.fused import final_hidden, fused_token_logprobs, output_layer
from stages.tasks.reasoning import extract_answer, normalise


class Discriminator(torch.nn.Module):
    """s(x, r) in (0, 1): max-pooled hidden states of a (question, rationale) through two linear layers."""

    def __init__(self, width: int, hidden: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled).squeeze(-1)


class QCRDLoss:
    """``loss(model, batch)`` of ``qcrd`` for ``fit``, with ``summary()`` for training.json."""

    def __init__(self, cfg, tokenizer, max_len: int):
        self.cfg, self.q, self.tokenizer, self.max_len = cfg, cfg.qcrd, tokenizer, max_len
        self.older = self.newer = None
        self.disc, self.opt, self.steps = None, None, 0
        self.kept, self.neg_ce, self.scores = [], [], []

    def __call__(self, m, b: dict) -> torch.Tensor:
        self._snapshot(m)
        ids, mask, labels, w = b["input_ids"], b["attention_mask"], b["labels"], b["w"]
        device = ids.device
        prompts, answers = self._prompts(ids, labels)
        negatives = self._negatives(prompts, answers, device)
        n_pos = len(ids)
        if negatives:
            neg = collate(negatives, self.tokenizer.pad_token_id)
            width = max(ids.shape[1], neg["input_ids"].shape[1])
            pad = self.tokenizer.pad_token_id
            ids = torch.cat([_pad(ids, width, pad), _pad(neg["input_ids"].to(device), width, pad)])
            mask = torch.cat([_pad(mask, width, 0), _pad(neg["attention_mask"].to(device), width, 0)])
            labels = torch.cat([_pad(labels, width, IGNORE), _pad(neg["labels"].to(device), width, IGNORE)])
        ce, pooled = self._sequence_ce(m, ids, mask, labels)
        s = self._scores(pooled, n_pos)
        pos_w = s[:n_pos] * w.to(s.dtype)
        loss = (pos_w * ce[:n_pos]).sum() / pos_w.sum().clamp_min(1e-12)
        if negatives:
            margin = torch.clamp(ce[n_pos:] - self.q.margin, max=0.0)  # min(CE(neg) - delta, 0)
            loss = loss - self.q.weight * ((1 - s[n_pos:]) * margin).mean()
            self.neg_ce.append(float(ce[n_pos:].detach().mean()))
        self.kept.append(len(negatives) / n_pos)
        self.steps += 1
        return loss

    def _snapshot(self, m) -> None:
        """Every ``lag`` steps the older copy takes the newer one's weights and the newer the
        student's: negatives come from a student ``lag`` to 2 ``lag`` steps old."""
        if self.newer is None:
            self.newer = copy.deepcopy(m).eval().requires_grad_(False)
            self.older = self.newer
        elif self.steps % self.q.lag == 0:
            self.older, self.newer = self.newer, copy.deepcopy(m).eval().requires_grad_(False)

    def _prompts(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[list[int]], list[str | None]]:
        """Each row's prompt ids and the (normalised) answer of its positive completion."""
        prompts, answers = [], []
        for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
            start = next(i for i, v in enumerate(lab) if v != IGNORE)
            prompts.append(row[:start])
            text = self.tokenizer.decode([t for t in lab[start:] if t != IGNORE], skip_special_tokens=True)
            answer = extract_answer(text)[0]
            answers.append(None if answer is None else normalise(answer))
        return prompts, answers

    def _negatives(self, prompts, answers, device) -> list[tuple[list[int], list[int]]]:
        """The older student's samples (``qcrd.temperature``), those with the positive's answer dropped."""
        gen = sample_continuations(self.older, self.tokenizer, prompts, max_new_tokens=self.cfg.lm.max_new_tokens,
                                   max_len=self.max_len, device=device, temperature=self.q.temperature)  # fmt: skip
        out = []
        for p, g, a in zip(prompts, gen, answers, strict=True):
            got = extract_answer(self.tokenizer.decode(g, skip_special_tokens=True))[0]
            if a is None or got is None or normalise(got) != a:
                out.append((p + g, [IGNORE] * len(p) + g))
        return out

    def _sequence_ce(self, m, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: the mean CE of its completion tokens [N], and its hidden states max-pooled
        over those positions [N, H], detached (the discriminator's input)."""
        keep = labels[:, 1:] != IGNORE
        targets = labels[:, 1:].clamp_min(0)
        layer = output_layer(m) if self.cfg.lm.loss_chunk > 0 else None
        if layer is not None:
            hidden, head = final_hidden(m, layer, input_ids=ids, attention_mask=mask)
            logp = fused_token_logprobs(hidden[:, :-1], head, keep, targets, chunk=self.cfg.lm.loss_chunk)
        else:
            out = m(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, targets[..., None]).squeeze(-1)[keep]
        seq = torch.arange(len(ids), device=ids.device)[:, None].expand_as(keep)[keep]
        lengths = keep.sum(1).clamp_min(1).to(logp.dtype)
        ce = torch.zeros(len(ids), dtype=logp.dtype, device=ids.device).index_add(0, seq, -logp) / lengths
        h = hidden[:, :-1].detach().float().masked_fill(~keep[..., None], float("-inf"))
        return ce, h.max(1).values.masked_fill(~keep.any(1)[:, None], 0.0)

    def _scores(self, pooled: torch.Tensor, n_pos: int) -> torch.Tensor:
        """Quality scores of every sequence (before this step's update), then one BCE step of the discriminator."""
        if self.disc is None:
            torch.manual_seed(self.cfg.seed)
            self.disc = Discriminator(pooled.shape[-1]).to(pooled.device)
            self.opt = torch.optim.Adam(self.disc.parameters(), lr=1e-3)
        with torch.enable_grad():
            logits = self.disc(pooled)
            target = torch.zeros_like(logits)
            target[:n_pos] = 1.0
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            self.opt.zero_grad(set_to_none=True)
            bce.backward()
            self.opt.step()
        s = torch.sigmoid(logits).detach()
        self.scores.append((float(s[:n_pos].mean()), float(s[n_pos:].mean()) if len(s) > n_pos else float("nan")))
        return s

    def summary(self) -> dict:
        """What the contrastive part did over training: negatives kept per positive, their CE, and
        the discriminator's mean scores of positives and negatives in the last tenth of the steps."""
        if not self.kept:
            return {}
        n = max(1, len(self.scores) // 10)
        last = self.scores[-n:]
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        return {"qcrd_negatives_per_positive": mean(self.kept), "qcrd_negative_ce_last": mean(self.neg_ce[-n:]),
                "qcrd_score_positive_last": mean([a for a, _ in last]), "qcrd_score_negative_last": mean([b for _, b in last])}  # fmt: skip


def _pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """``t`` [B, T] right-padded with ``value`` to ``width`` columns."""
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def qcrd_rows(part_loader, files, data):
    """(``part_loader`` keeping only the self-consistent samples, their count per part and split):
    each prompt's majority answer (``stages.lm.selectors.majority`` over the whole table), QCRD's
    denoised positives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.config import SelectConfig
    from stages.lm.selectors import majority

    tables = [pq.read_table(f, columns=["id", "prompt_id", "answer", "split"]) for f in files]
    table = pa.concat_tables(tables)
    keep, _, _ = majority(table, SelectConfig())
    ids = {i for i, k in zip(table.column("id").to_pylist(), keep, strict=True) if k}
    if not ids:
        raise DistilError(f"qcrd found no self-consistent teacher samples in {data} (no prompt has a parsed majority answer)")
    per_part = {str(f): t for f, t in zip(files, tables, strict=True)}

    def loader(f, split):
        load = part_loader(f, split)
        return lambda: [r for r in load() if r["id"] in ids]

    def count(f, split) -> int:
        t = per_part[str(f)]
        return sum(s == split and i in ids for i, s in zip(t.column("id").to_pylist(), t.column("split").to_pylist(), strict=True))

    return loader, count
