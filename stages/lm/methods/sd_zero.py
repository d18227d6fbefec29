"""The loss of ``distil distill --method sd-zero``: Self-Distillation Zero ("Self-Distillation Zero:
Self-Revision Turns Binary Rewards into Dense Supervision", 2026). One model, two roles:

1. **Self-revision training (SRT, section 3.1, eq. 1).** For each of the first ``srt_prompts``
   training questions the model answers once (y_init, temperature 1) and the verifier scores
   it; then, as the reviser, it reads the question, its answer and a verdict phrase P_r
   ("Let me rephrase the above solution." when right, "Wait, this response is not correct, let
   me start over." when wrong; ``reward.revise`` lays them out) and samples ``revisions``
   revisions. Revisions the verifier scores right are kept, and the model is fine-tuned on them
   with CE on the revision given (x, y_init, P_r) for ``srt_epochs`` passes. (The paper's
   generation term, eq. 2, also teaches the generator to continue an answer with its revision;
   answers here are read from their first line, so it is left out.)
2. **On-policy self-distillation (eq. 4).** The SRT model, frozen, is the teacher. Each step the
   student (the generator) answers every batch prompt once; the teacher reads the question,
   that answer and the verdict its reward earns, and re-scores the answer's own tokens as a
   revision; the student minimises KL(p_student || p_teacher) over the teacher's top-``TOP_K``
   at those tokens. Where the answer was right the reviser agrees with it; where it was wrong
   the reviser's distribution moves away from the tokens that made it wrong: a binary reward
   turned into a per-token signal.
"""

from __future__ import annotations

import copy

import torch

from stages.lm.methods.on_policy import scored_top_k
from stages.lm.methods.reward import RewardLoss
from stages.lm.training import IGNORE, batches, collate, next_token_loss
from stages.losses import DIVERGENCES
from stages.losses.fused import final_hidden, fused_top_k, output_layer

TOP_K = 64
VERDICT = {True: "Let me rephrase the above solution.", False: "Wait, this response is not correct, let me start over."}


class SDZeroLoss(RewardLoss):
    """Phase 1 in ``prepare`` (before ``fit``), phase 2 as ``loss(model, batch)``; see the module docstring."""

    def __init__(self, method, cfg, tokenizer, max_len: int, verifier):
        super().__init__(method, cfg, None, tokenizer, max_len, verifier)
        self.reviser, self.srt = None, {}

    def prepare(self, model, train, device) -> None:
        """Self-revision training on the first ``srt_prompts`` train rows, then freeze the reviser."""
        r, prompts, keys = self.r, [], []
        for row in train.raw():
            ids, labels, *_, key = train.encode_row(row)  # as training encodes it (chat rows rendered): prompt ids, row key
            prompts.append(ids[: next(i for i, v in enumerate(labels) if v != IGNORE)])
            keys.append(key)
            if len(prompts) >= r.srt_prompts:
                break
        traces, right_first = [], 0
        for lo in range(0, len(prompts), self.cfg.batch_size):
            part, part_keys = prompts[lo : lo + self.cfg.batch_size], keys[lo : lo + self.cfg.batch_size]
            first = self._sample(model, part, device)
            verdicts = [self.verifier.reward(k, self.tokenizer.decode(y, skip_special_tokens=True)) >= 1 for k, y in zip(part_keys, first, strict=True)]
            right_first += sum(verdicts)
            contexts = [self._context(p, y, v) for p, y, v in zip(part, first, verdicts, strict=True)]
            revised = self._sample(model, [c for c in contexts for _ in range(r.revisions)], device)
            for j, y in enumerate(revised):
                i = j // r.revisions
                if self.verifier.reward(part_keys[i], self.tokenizer.decode(y, skip_special_tokens=True)) >= 1:
                    traces.append(((contexts[i] + y)[: self.max_len], ([IGNORE] * len(contexts[i]) + y)[: self.max_len]))
        self.srt = {"srt_prompts": len(prompts), "srt_first_right": right_first, "srt_traces": len(traces)}
        if traces:
            opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr)
            g = torch.Generator().manual_seed(self.cfg.seed)
            model.train()
            for _ in range(r.srt_epochs):
                order = torch.randperm(len(traces), generator=g).tolist()
                for chunk in batches([traces[i] for i in order], self.cfg.batch_size):
                    b = {k: v.to(device) for k, v in collate(chunk, self.tokenizer.pad_token_id).items()}
                    opt.zero_grad(set_to_none=True)
                    next_token_loss(model, b, chunk=self.cfg.lm.loss_chunk).backward()
                    opt.step()
        self.reviser = copy.deepcopy(model).eval().requires_grad_(False)

    def __call__(self, m, b: dict) -> torch.Tensor:
        from stages.lm.teachers.transformers_backend import TransformersTeacher

        ids, mask, labels, rewards, prompts, completions = self._rollouts(m, b, group=1)  # one answer per prompt
        contexts = [self._context(p, c, bool(r >= 1)) for p, c, r in zip(prompts, completions, rewards.tolist(), strict=True)]
        teacher = TransformersTeacher("reviser", ids.device, model=self.reviser, tokenizer=self.tokenizer)
        target = tuple(t[:, :-1] for t in scored_top_k(teacher, ids, labels, TOP_K, prompts=contexts))
        keep = labels[:, 1:] != IGNORE
        hyper = {"temperature": 1.0}
        layer = output_layer(m) if self.cfg.lm.loss_chunk > 0 else None
        if layer is None:
            logits = m(input_ids=ids, attention_mask=mask).logits
            return DIVERGENCES["reverse-kl"](logits[:, :-1], target, mask=keep, **hyper)
        hidden, head = final_hidden(m, layer, input_ids=ids, attention_mask=mask)
        return fused_top_k(hidden[:, :-1], head, keep, None, target, DIVERGENCES["reverse-kl"], hyper=hyper, alpha=1.0,
                           chunk=self.cfg.lm.loss_chunk)  # fmt: skip

    def _sample(self, model, prompts: list[list[int]], device) -> list[list[int]]:
        from stages.lm.generation import sample_continuations

        return sample_continuations(model, self.tokenizer, prompts, max_new_tokens=self.cfg.lm.max_new_tokens,
                                    max_len=self.max_len, device=device)  # fmt: skip

    def _context(self, prompt: list[int], answer: list[int], right: bool) -> list[int]:
        """The reviser's prompt: ``reward.revise`` with the question, the answer and its verdict."""
        text = (self.r.revise.replace("{verdict}", VERDICT[right])
                .replace("{response}", self.tokenizer.decode(answer, skip_special_tokens=True).strip())
                .replace("{prompt}", self.tokenizer.decode(prompt, skip_special_tokens=True)))  # fmt: skip
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def summary(self) -> dict:
        return {**super().summary(), **self.srt}
