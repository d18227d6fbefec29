"""The losses of the reward-aware LM methods, ``grpo`` and ``rlad``: the student samples a group
of completions per prompt, the task's verifier scores each one (``stages.lm.scoring.scorer``:
reasoning-gym's own ``score_answer``, else exact match with the gold answer), and a clipped
likelihood-ratio objective moves probability toward the completions that scored above their
group's mean.

One rollout feeds one optimiser step (the fully on-policy case, mu = 1 in GRPO's notation), so the
old policy is the sampling one: ``grpo``'s ratio is 1 in value with the policy gradient's
gradient, and its clipping is there for ``rlad``, whose anchor is not the old policy.
"""

from __future__ import annotations

import copy

import torch

from stages.config import DistillConfig
from stages.errors import DistilError
from stages.lm.generation import sample_continuations
from stages.lm.methods import LMMethod
from stages.lm.training import IGNORE, collate
from stages.losses.fused import final_hidden, fused_token_logprobs, output_layer
from stages.tasks.reasoning import extract_answer


class Verifier:
    """The training prompts' verifier: rows by a small integer key (which the encoded rows carry
    into the batch as ``key``) and ``score(row, answer)`` -> reward in [0, 1] (None: not scorable)."""

    def __init__(self, score):
        self.score, self.rows, self._keys = score, [], {}

    def key(self, row: dict) -> int:
        """The row's key (the same one each time the row is encoded)."""
        ident = (row.get("split"), row.get("item"), row.get("id"), row["prompt"], str(row.get("answer")))
        if ident not in self._keys:
            self._keys[ident] = len(self.rows)
            self.rows.append(row)
        return self._keys[ident]

    def tagging(self, encode_row):
        """``encode_row`` whose tuples end with the row's key (``collate`` makes it ``batch["key"]``)."""
        return lambda row: (*encode_row(row), self.key(row))

    def reward(self, key: int, completion: str) -> float:
        r = self.score(self.rows[key], extract_answer(completion)[0])
        return 0.0 if r is None else float(r)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al., "DeepSeekMath", 2024, section 4.1.2; RLAD section 3):
    each reward of a group [P, G] minus the group mean, over the group's standard deviation
    (population, over the G completions; + 1e-4 so a group that all scored alike gets 0, not NaN)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True, correction=0) + 1e-4)


def clipped_surrogate(log_ratio: torch.Tensor, advantage: torch.Tensor, clip: float) -> torch.Tensor:
    """Per token, PPO's clipped objective (Schulman et al. 2017, eq. 7; GRPO's eq. 3 per token):
    min(r A, clip(r, 1 - e, 1 + e) A), r = exp(``log_ratio``)."""
    ratio = torch.exp(log_ratio)
    return torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)


def trrd_log_ratio(logp: torch.Tensor, old: torch.Tensor, teacher: torch.Tensor, mix: float) -> torch.Tensor:
    """RLAD's Trust Region Ratio (Zhang et al. 2026, eq. 3 and 5): r = (pi_S / pi_old)^a (pi_S / pi_T)^(1 - a),
    i.e. pi_S over the geometric anchor pi_old^a pi_T^(1 - a), with a = 1 - ``mix``; log(pi_S / pi_T) is
    clamped to [-1, 1] first (their appendix B stabiliser). ``mix`` = 0 is GRPO's ratio pi_S / pi_old."""
    own = logp - old.detach()
    if mix <= 0:
        return own
    return (1 - mix) * own + mix * (logp - teacher.detach()).clamp(-1.0, 1.0)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """GRPO's per-token KL to the reference policy (DeepSeekMath eq. 4, Schulman's k3 estimator):
    pi_ref / pi - log(pi_ref / pi) - 1, unbiased and never negative."""
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1


class RewardLoss:
    """``loss(model, batch)`` of ``grpo`` / ``rlad`` for ``fit``, with ``summary()`` for training.json.

    ``grpo`` (Shao et al. 2024, eq. 3, outcome supervision): per prompt G = ``reward.group_size``
    completions o_i, advantages ``group_advantages``, and the objective
    1/G sum_i 1/|o_i| sum_t [min(r A_i, clip(r) A_i) - kl * k3], r = pi_theta / pi_old.

    ``rlad`` (Zhang et al., "Reinforcement-aware Knowledge Distillation for LLM Reasoning", 2026,
    eq. 4, Trust Region Ratio Distillation): the same objective with GRPO's ratio replaced by
    ``trrd_log_ratio``'s, taken against the geometric anchor pi_old^a pi_T^(1 - a) of the old policy
    and the live teacher (a = 1 - ``reward.teacher_mix``; the paper's a = 0.5 is the default) and no
    separate teacher KL. Where the teacher favours a token more than the student the ratio starts
    below 1, so a positive advantage keeps pushing it up beyond GRPO's trust region and a negative
    one is clipped early (it stops pulling the token down); tokens the teacher disfavours the other
    way round: the student imitates the teacher only where that agrees with the advantage."""

    def __init__(self, method: LMMethod, cfg: DistillConfig, teacher, tokenizer, max_len: int, verifier: Verifier):
        self.cfg, self.r, self.teacher, self.tokenizer, self.max_len = cfg, cfg.reward, teacher, tokenizer, max_len
        self.verifier, self.mix = verifier, cfg.reward.teacher_mix if method.teacher == "live" else 0.0
        self.ref, self.rewards, self.solved = None, [], []

    def __call__(self, m, b: dict) -> torch.Tensor:
        if self.r.kl > 0 and self.ref is None:  # the starting student, frozen: GRPO's reference policy
            self.ref = copy.deepcopy(m).eval().requires_grad_(False)
        ids, mask, labels, rewards, prompts, completions = self._rollouts(m, b)
        g = self.r.group_size
        adv = group_advantages(rewards.view(-1, g)).view(-1).to(ids.device)
        keep = labels[:, 1:] != IGNORE
        logp = self._logprobs(m, ids, mask, labels, keep)
        teacher = logp
        if self.mix > 0:
            scored = self.teacher.score(prompts, completions, 1)
            teacher = torch.cat([torch.as_tensor(s.logprobs, dtype=logp.dtype) for s in scored]).to(logp.device)
        seq = torch.arange(len(ids), device=ids.device)[:, None].expand_as(keep)[keep]  # each token's sequence
        objective = clipped_surrogate(trrd_log_ratio(logp, logp, teacher, self.mix), adv[seq], self.r.clip)
        if self.ref is not None:
            with torch.no_grad():
                ref = self._logprobs(self.ref, ids, mask, labels, keep)
            objective = objective - self.r.kl * k3_kl(logp, ref)
        lengths = keep.sum(1).clamp_min(1).to(objective.dtype)
        per_seq = torch.zeros(len(ids), dtype=objective.dtype, device=ids.device).index_add(0, seq, objective) / lengths
        return -per_seq.mean()

    def _rollouts(self, m, b: dict, group: int | None = None):
        """``group`` (default ``reward.group_size``) completions per prompt of the batch, sampled by the
        student (temperature 1, KV cache, ``lm.max_new_tokens``), collated, with their rewards [P * G]
        in prompt-major order."""
        g, keys = group or self.r.group_size, b["key"].tolist()
        prompts = []
        for row, lab in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True):
            prompts += [row[: next(i for i, v in enumerate(lab) if v != IGNORE)]] * g
        gen = sample_continuations(m, self.tokenizer, prompts, max_new_tokens=self.cfg.lm.max_new_tokens,
                                   max_len=self.max_len, device=b["input_ids"].device)  # fmt: skip
        texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        rewards = torch.tensor([self.verifier.reward(keys[i // g], t) for i, t in enumerate(texts)])
        self._last_rewards = rewards.tolist()
        self.rewards.append(float(rewards.mean()))
        self.solved.append(float((rewards.view(-1, g).max(1).values >= 1).float().mean()))
        batch = collate([(p + c, [IGNORE] * len(p) + c) for p, c in zip(prompts, gen, strict=True)], self.tokenizer.pad_token_id)
        device = b["input_ids"].device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device), rewards, prompts, gen

    def _logprobs(self, m, ids, mask, labels, keep) -> torch.Tensor:
        """log pi(o_t) of every completion token, in ``keep`` order: fused and chunked where the model
        allows (``lm.loss_chunk``), else from its full logits."""
        targets = labels[:, 1:].clamp_min(0)
        layer = output_layer(m) if self.cfg.lm.loss_chunk > 0 else None
        if layer is None:
            logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
            return lp[keep]
        hidden, head = final_hidden(m, layer, input_ids=ids, attention_mask=mask)
        return fused_token_logprobs(hidden[:, :-1], head, keep, targets, chunk=self.cfg.lm.loss_chunk)

    def summary(self) -> dict:
        """Mean reward of the student's rollouts over training: the first and last tenth of the steps."""
        n = max(1, len(self.rewards) // 10)
        if not self.rewards:
            return {}
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"rollout_reward_first": mean(self.rewards[:n]), "rollout_reward_last": mean(self.rewards[-n:]),
                "rollout_solved_last": mean(self.solved[-n:]), "rollout_steps": len(self.rewards)}  # fmt: skip


def check_reward_data(cfg: DistillConfig, data, teacher_data: bool, table, task) -> None:
    """A reward method needs prompts with a verifier: a reasoning task, or a prompt table with gold answers."""
    if teacher_data:
        raise DistilError(f"{cfg.method} samples and scores its own completions: pass the task or prompt table "
                          f"(e.g. --data basic_arithmetic), not teacher data")  # fmt: skip
    if task is None and not any(a is not None and str(a).strip() for a in table.column("answer").to_pylist()):
        raise DistilError(f"{cfg.method} rewards completions with a verifier, and {data} has none: its prompts have no "
                          "gold answers; pass a reasoning task (e.g. basic_arithmetic) or a table with an answer column")  # fmt: skip
    if cfg.reward.group_size < 2:
        raise DistilError(f"reward.group_size is {cfg.reward.group_size}: {cfg.method}'s advantages are relative to a "
                          "group of completions per prompt; set reward.group_size >= 2")  # fmt: skip
