"""The reward-aware LM methods (``grpo``, ``rlad``): their maths against hand computations, the
loss on a tiny model (fused = unfused, rlad at teacher_mix 0 = grpo, the reward rises), and the
CLI with its bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from stages.config import DistillConfig, LMConfig, RewardConfig
from stages.lm.methods import LM_METHODS
from stages.lm.methods.reward import RewardLoss, Verifier, clipped_surrogate, group_advantages, k3_kl, trrd_log_ratio
from stages.lm.methods.sd_zero import SDZeroLoss
from stages.lm.methods.srpo import SelfDistillLoss, _entropy_weights
from stages.lm.models import LMSize, build_lm, draw_wide
from stages.lm.training import IGNORE, collate

V, GOOD = 40, set(range(3, 10))  # the toy task: a completion is right when its first token is one of GOOD


def test_group_advantages_are_standardised_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(a[1], torch.zeros(4))  # all alike: nothing to prefer
    assert a[2, 3] == pytest.approx(3**0.5, rel=1e-3) and a[2, :3].sum() == pytest.approx(-(3**0.5), rel=1e-3)


def test_grpo_surrogate_is_the_policy_gradient_at_the_sampling_policy():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    obj = clipped_surrogate(trrd_log_ratio(logp, logp, logp, 0.0), adv, 0.2)
    assert torch.allclose(obj, adv)  # the ratio is 1
    obj.sum().backward()
    assert torch.allclose(logp.grad, adv)  # d/d logp of r A at r = 1


def test_trrd_ratio_is_the_student_over_the_geometric_anchor_with_the_clamp():
    logp, old, teacher = torch.tensor([-1.0, -1.0, -3.0]), torch.tensor([-1.2, -1.0, -3.0]), torch.tensor([-1.5, -4.0, -0.5])
    got = trrd_log_ratio(logp, old, teacher, 0.3)
    clamp = (logp - teacher).clamp(-1, 1)
    assert torch.allclose(got, 0.7 * (logp - old) + 0.3 * clamp)
    assert got[1] == pytest.approx(0.3)  # log(pi_S / pi_T) = 3, clamped to 1
    assert torch.equal(trrd_log_ratio(logp, old, teacher, 0.0), logp - old)


def test_rlad_imitates_only_where_the_teacher_agrees_with_the_advantage():
    """A token the teacher favours (ratio below 1 - clip at the sampling policy): a negative advantage
    is clipped (no gradient pulls it down), a positive one still pushes it up; the reverse for a
    token the teacher disfavours."""
    logp = torch.tensor([-2.0, -2.0, -0.5, -0.5], requires_grad=True)
    teacher = torch.tensor([-0.2, -0.2, -3.0, -3.0])  # favours tokens 0-1, disfavours 2-3
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    clipped_surrogate(trrd_log_ratio(logp, logp, teacher, 0.5), adv, 0.2).sum().backward()
    g = logp.grad
    assert g[0] == 0 and g[1] > 0  # favoured: kept up, not pushed down
    assert g[2] == 0 and g[3] < 0  # disfavoured: not pushed up, pushed down


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    lp = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(k3_kl(lp, lp), torch.zeros(3))
    assert (k3_kl(lp, lp + torch.tensor([0.5, -0.5, 1.0])) > 0).all()


class Tok:
    """A tokenizer stub: token i decodes to ``t<i>``."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def __len__(self):
        return V

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i in (0, 1, 2)))

    def __call__(self, text, add_special_tokens=False):  # a word that is no t<i> becomes token 3
        ids = [int(w[1:]) if w[:1] == "t" and w[1:].isdigit() else 3 for w in text.split()]
        return {"input_ids": ids}


def toy(seed: int = 0):
    torch.manual_seed(seed)
    model = build_lm("llama", LMSize(hidden=16, layers=1, heads=2, intermediate=32, context=32), Tok()).float()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    verifier = Verifier(lambda row, answer: float(answer is not None and int(answer.split()[0][1:]) in GOOD))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(4):
        p = torch.randint(10, V, (5,), generator=g).tolist()
        rows.append((p + [3], [IGNORE] * 5 + [3], None, None, 1.0, verifier.key({"prompt": str(p), "split": "train", "id": i})))
    return model.train(), verifier, collate(rows, 0)


def reward_cfg(chunk: int, **reward) -> DistillConfig:
    return DistillConfig(method="grpo", lm=LMConfig(loss_chunk=chunk, max_new_tokens=3), reward=RewardConfig(**reward))


def run(model, loss_fn, b, seed=1):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, b)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(a, b, atol=1e-5):
    return torch.allclose(a[0], b[0], atol=atol) and a[1].keys() == b[1].keys() and all(
        torch.allclose(a[1][k], b[1][k], atol=atol) for k in a[1]
    )


class Scorer:
    """A live teacher as RLAD reads it: ``score`` (per-token log-probs of given completions)."""

    def __init__(self, model):
        from stages.lm.teachers.transformers_backend import TransformersTeacher

        self.inner = TransformersTeacher("teacher", "cpu", model=model.eval(), tokenizer=Tok())

    def score(self, prompts, completions, k):
        return self.inner.score(prompts, completions, k)


def test_fused_and_unfused_log_probs_give_the_same_loss_and_gradients():
    model, verifier, b = toy()
    got = {c: run(model, RewardLoss(LM_METHODS["grpo"], reward_cfg(c, group_size=6, kl=0.1), None, Tok(), 32, verifier), b)
           for c in (0, 2, 256)}  # fmt: skip
    assert close(got[2], got[0]) and close(got[256], got[0])
    assert any(g.abs().sum() > 0 for g in got[0][1].values())


def test_rlad_at_teacher_mix_zero_is_grpo_and_above_zero_differs():
    model, verifier, b = toy()
    teacher = Scorer(draw_wide(toy(seed=7)[0], 0.5, seed=7))  # peaked: its log-probs far from the student's
    grpo = run(model, RewardLoss(LM_METHODS["grpo"], reward_cfg(256, group_size=6), None, Tok(), 32, verifier), b)
    rlad = {w: run(model, RewardLoss(LM_METHODS["rlad"], reward_cfg(256, group_size=6, teacher_mix=w), teacher, Tok(), 32, verifier), b)
            for w in (0.0, 0.5)}  # fmt: skip
    assert close(rlad[0.0], grpo)
    assert not close(rlad[0.5], grpo, atol=1e-4)


def _good_share(model, b) -> float:
    """The model's probability of a right first token, averaged over the prompts."""
    with torch.no_grad():
        first = [next(i for i, v in enumerate(lab) if v != IGNORE) for lab in b["labels"].tolist()]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        p = torch.softmax(logits[torch.arange(len(first)), torch.tensor(first) - 1], -1)
    return float(p[:, sorted(GOOD)].sum(-1).mean())


def test_grpo_steps_raise_the_verified_reward():
    model, verifier, b = toy()
    loss_fn = RewardLoss(LM_METHODS["grpo"], reward_cfg(256, group_size=8), None, Tok(), 32, verifier)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    before = _good_share(model, b)
    torch.manual_seed(0)
    for _ in range(25):
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
    assert before < 0.3 and _good_share(model, b) > 0.8
    s = loss_fn.summary()
    assert s["rollout_steps"] == 25 and s["rollout_reward_last"] > s["rollout_reward_first"] + 0.3


def test_srpo_routes_failed_rollouts_with_a_correct_sibling_to_self_distillation_and_sdpo_routes_all():
    model, verifier, b = toy()
    cfg = reward_cfg(256, group_size=8)
    srpo = SelfDistillLoss(LM_METHODS["srpo"], cfg, Tok(), 64, verifier, route_grpo=True)
    sdpo = SelfDistillLoss(LM_METHODS["sdpo"], cfg, Tok(), 64, verifier, route_grpo=False)
    grpo = RewardLoss(LM_METHODS["grpo"], cfg, None, Tok(), 64, verifier)
    for loss_fn in (srpo, sdpo, grpo):
        run(model, loss_fn, b, seed=3)  # the same rollouts for all three
    rewards = grpo.rewards[0]  # the batch's mean reward: a share of the 32 rollouts is right (first token in GOOD)
    assert 0 < rewards < 1
    right = torch.tensor(grpo._last_rewards).view(-1, 8) >= 0.5
    has_sibling = right.sum(1, keepdim=True) - right.long() > 0
    assert srpo.sdpo_share[0] == pytest.approx(float(((~right) & has_sibling).float().mean()))
    assert sdpo.sdpo_share[0] == pytest.approx(float(has_sibling.float().mean())) and sdpo.sdpo_share[0] > srpo.sdpo_share[0]
    a, b_ = run(model, srpo, b, seed=3), run(model, grpo, b, seed=3)
    assert not close(a, b_, atol=1e-7)  # the self-distilled tokens change the update


def test_entropy_weights_favour_a_sure_self_teacher_and_average_one():
    sure = torch.log(torch.tensor([0.97, 0.01, 0.01]))
    unsure = torch.log(torch.tensor([0.34, 0.33, 0.33]))
    t_lp = torch.stack([sure, unsure, unsure])[None]  # [1, 3 positions, k]
    keep = torch.tensor([[True, True, False]])
    w = _entropy_weights(t_lp, keep)
    assert w[0, 0] > w[0, 1] > 0 and w[0, 2] == 0 and float(w[keep].mean()) == pytest.approx(1.0)


def test_sd_zero_keeps_only_verified_revisions_then_distils_its_frozen_reviser():
    from stages.lm.training import RowSource

    model, verifier, b = toy()
    raw = [{"i": i} for i in range(4)]
    encoded = dict(enumerate(_rows_of(b)))
    train = RowSource([lambda: raw], [4], lambda r: encoded[r["i"]])
    cfg = DistillConfig(method="sd-zero", batch_size=4, lr=0.01, lm=LMConfig(max_new_tokens=3),
                        reward=RewardConfig(srt_prompts=4, revisions=6, srt_epochs=2))  # fmt: skip
    loss_fn = SDZeroLoss(LM_METHODS["sd-zero"], cfg, Tok(), 64, verifier)
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn.prepare(model, train, "cpu")
    srt = loss_fn.srt
    assert srt["srt_prompts"] == 4 and 0 < srt["srt_traces"] < 4 * 6  # some revisions right, not all
    trained = any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert trained and all(not p.requires_grad for p in loss_fn.reviser.parameters())
    frozen = {k: v.clone() for k, v in loss_fn.reviser.state_dict().items()}
    unfused = _sdz_loss(loss_fn, model, b, 0)
    assert close(_sdz_loss(loss_fn, model, b, 2), unfused) and unfused[0] > 0
    assert all(torch.equal(frozen[k], v) for k, v in loss_fn.reviser.state_dict().items())  # phase 2 leaves it alone


def _rows_of(b):
    """A collated batch back into ``collate``'s rows (ids, labels, None, None, weight, key), padding dropped."""
    out = []
    for ids, m, lab, w, k in zip(b["input_ids"], b["attention_mask"], b["labels"], b["w"], b["key"], strict=True):
        n = int(m.sum())
        out.append((ids[:n].tolist(), lab[:n].tolist(), None, None, float(w), int(k)))
    return out


def _sdz_loss(loss_fn, model, b, chunk):
    import dataclasses

    loss_fn.cfg = dataclasses.replace(loss_fn.cfg, lm=dataclasses.replace(loss_fn.cfg.lm, loss_chunk=chunk))
    return run(model, loss_fn, b, seed=5)


LM = ["--set", "data.sizes=[60,10,10]", "--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2",
      "--set", "lm.vocab_size=320", "--set", "batch_size=8", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_student(tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("reward")
    Cli(write_params(root)).ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", root / "sft",
                               "--set", "epochs=2", "--set", "lr=0.01", *LM)  # fmt: skip
    return root / "sft"


@pytest.mark.parametrize("method", ["grpo", "rlad", "srpo", "sdpo", "sd-zero"])
def test_reward_methods_train_through_the_cli_and_record_their_rollouts(cli, sft_student, tmp_path, method):
    teacher = ["--teacher", str(sft_student)] if method == "rlad" else []
    cli.ok("distill", "--method", method, "--data", "basic_arithmetic", "--student", sft_student, *teacher, "--out",
           tmp_path / "m", "--set", "steps=6", "--set", "lm.max_new_tokens=4", "--set", "reward.group_size=3", *LM)  # fmt: skip
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    assert summary["method"] == method and summary["rollout_steps"] == 8  # steps round to whole epochs: 60 / 8 -> 8 batches
    assert 0.0 <= summary["rollout_reward_first"] <= 1.0 and 0.0 <= summary["rollout_reward_last"] <= 1.0
    assert ("self_distilled_share" in summary) == (method in ("srpo", "sdpo"))
    assert ("srt_traces" in summary) == (method == "sd-zero")


def test_reward_methods_refuse_what_they_cannot_train_on(cli, sft_student, tmp_path):
    common = ["--out", tmp_path / "m", *LM]
    cli.fails("distill", "--method", "grpo", "--data", "basic_arithmetic", "--student", sft_student,
              "--set", "reward.group_size=1", *common, match="group_size")  # fmt: skip
    cli.fails("distill", "--method", "rlad", "--data", "basic_arithmetic", "--student", sft_student, *common,
              match="needs exactly one live teacher")  # fmt: skip
    table = tmp_path / "prompts.jsonl"
    table.write_text("".join(json.dumps({"prompt": f"say {i}", "split": s}) + "\n" for i, s in enumerate(["train", "dev"] * 4)))
    cli.fails("distill", "--method", "grpo", "--data", table, "--student", sft_student, *common, match="verifier")
    assert not (tmp_path / "m").exists()
