"""The in-process ``Teacher``: a transformers causal LM (a model directory, a shipped name
such as ``smollm2-135m``, or a hub name for online users).

``generate`` is ``stages.lm.generation.sample`` on the whole prompt list with the call's
seed (batched, KV cache, untempered top-k log-probs); ``score`` is one teacher forward pass
over prompt + completion, right-padded. Besides the protocol it offers ``logits`` (the full
next-token distribution), which on-policy distillation uses for its dense divergence when
the teacher runs in the same process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.lm.teachers.base import Completion, Sampling, Scored, finish_reason


class TransformersTeacher:
    """A local transformers teacher. ``decode`` (SCMoE's logits processors) and ``routing``
    (record an MoE teacher's experts per generated token) are passed to ``sample``."""

    def __init__(self, path: str | Path, device, *, model=None, tokenizer=None, decode=None, routing: bool = False):
        from stages.lm.models import lm_identity, load_lm

        if model is None:
            model, tokenizer = load_lm(path, device)
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.decode, self.routing = decode, routing
        self.identity = {"backend": "transformers", **lm_identity(path)}
        cfg = model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Completion]:
        from stages.lm.generation import sample

        if not prompts:
            return []
        if sampling.temperature <= 0 and n > 1:  # greedy decoding gives one answer: computed once, repeated n times
            once = self.generate(prompts, 1, sampling)
            return [c for c in once for _ in range(n)]
        torch.manual_seed(sampling.seed)
        rows = sample(self.model, self.tokenizer, prompts, samples=n, temperature=sampling.temperature, top_p=sampling.top_p,
                      max_new_tokens=sampling.max_new_tokens, top_k=sampling.top_k, device=self.device, decode=self.decode,
                      routing=self.routing)  # fmt: skip
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        k = min(sampling.top_k, len(self.tokenizer)) if sampling.top_k else 0
        eos = self.tokenizer.eos_token_id
        out = []
        for i, r in enumerate(rows):
            extra = {key: r[key] for key in ("expert_ids", "expert_weights") if key in r}
            out.append(Completion(
                text=r["completion"], token_ids=r["token_ids"], seq_logprob=r["seq_logprob"], topk_ids=r["topk_ids"],
                topk_logprobs=r["topk_logprobs"], k=k, finish_reason=finish_reason(r["token_ids"], eos, sampling.max_new_tokens),
                prompt_tokens=lengths[i // n], completion_tokens=len(r["token_ids"]), extra=extra,
            ))  # fmt: skip
        return out

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, V] (float32) of a right-padded batch."""
        return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits.float()

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], top_k: int) -> list[Scored]:
        if not prompt_ids:
            return []
        seqs = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
        width, pad = max(len(s) for s in seqs), self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        lp = torch.log_softmax(self.logits(ids, mask), dim=-1)
        k = min(top_k, lp.shape[-1])
        out = []
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))  # logits[t] predicts token t + 1
            rows = lp[i, pos]
            chosen = rows.gather(-1, torch.tensor(c, dtype=torch.long)[:, None]).squeeze(-1) if c else torch.zeros(0)
            v, j = rows.topk(k, dim=-1) if k else (torch.zeros(len(c), 0), torch.zeros(len(c), 0, dtype=torch.long))
            out.append(Scored(chosen.cpu().numpy(), j.cpu().numpy().astype(np.int64), v.cpu().numpy()))
        return out

    def close(self) -> None:
        self.model = None
