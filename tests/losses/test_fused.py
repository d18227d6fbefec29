"""The fused, chunked student losses (``stages.losses.fused``) against today's unfused path: the same
value and gradients for every divergence, TSD's selection, the dense on-policy divergence and CE,
with masks, row weights and chunk sizes that do and do not divide the token count; the logits never
exist whole; the hidden-state helper on every family distil trains, LoRA and DDP students and MoE
aux losses; and a few kd training steps that end at the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stages.config import DistillConfig, LMConfig
from stages.lm.methods import LM_METHODS
from stages.lm.methods.token_level import _chunk_selection, _token_selection, top_k_loss
from stages.lm.models import LMSize, build_lm
from stages.lm.training import IGNORE, RouterAuxLoss, next_token_loss, token_ce
from stages.losses import DIVERGENCES
from stages.losses.fused import Head, final_hidden, fused_ce, fused_dense, fused_top_k, output_layer

CASES = [
    ("kd", {"temperature": 2.0}),
    ("reverse-kl", {"temperature": 1.5}),
    ("jsd", {"beta": 0.3, "temperature": 1.0}),
    ("jsd", {"beta": 1.0, "temperature": 2.0}),
    ("jsd", {"beta": 0.0, "temperature": 1.5}),
    ("jsd", {"beta": 0.5, "temperature": 2.0}),
    ("skew-kl", {"skew": 0.1, "reverse": False, "temperature": 2.0}),
    ("skew-kl", {"skew": 0.2, "reverse": True, "temperature": 1.0}),
    ("tvd", {"temperature": 1.0}),
]
B, T, H, V, K = 3, 9, 6, 23, 5
CHUNKS = [1, 4, 7, 1000]  # of 14 kept tokens: 4 leaves a short last chunk, 7 divides them, 1000 is one chunk


def batch(seed: int = 0, peaked: float = 1.0):
    """float64 hidden states, output layer and bias; labels with prompt and padding holes; row
    weights; a sparse top-k teacher at every position (-1e4 where nothing is stored)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * peaked).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3], labels[1, 7:], labels[2, :5] = IGNORE, IGNORE, IGNORE
    t_lp = torch.log_softmax(torch.randn(B, T - 1, V, generator=g) * 3, -1).topk(K, -1)
    t_ids, t_lps = t_lp.indices, t_lp.values.clone()
    t_lps[0, 0] = -1e4  # a prompt position as collate leaves it
    return h, w, b, labels, (t_ids, t_lps), torch.tensor([1.0, 0.5, 2.0])


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def gap(a, b) -> float:
    return abs(float((a - b).detach()))


def close(a, b, atol=1e-6):
    return all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name,hyper", CASES)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_sparse_divergences_mixed_with_ce_equal_the_unfused_loss(name, hyper, alpha, chunk):
    h, w, b, labels, teacher, rw = batch()
    keep, row_w = labels[:, 1:] != IGNORE, rw[:, None].expand(B, T - 1)
    assert int(keep.sum()) == 14
    logits = F.linear(h, w, b)
    ref = DIVERGENCES[name](logits[:, :-1], teacher, mask=keep, weight=row_w, **hyper)
    if alpha < 1:
        ref = alpha * ref + (1 - alpha) * token_ce(logits, labels, rw)
    fused = fused_top_k(h[:, :-1], Head(w, b), keep, labels[:, 1:], teacher, DIVERGENCES[name], hyper=hyper, weight=row_w,
                        alpha=alpha, chunk=chunk)  # fmt: skip
    assert gap(fused, ref) < 1e-6 and float(ref.detach()) > 1e-3
    assert close(grads(fused, [h, w, b]), grads(ref, [h, w, b]))
    if alpha == 1.0:  # no CE: today's token_ce works in float32; the divergences match to rounding
        assert gap(fused, ref) < 1e-12


def test_a_confident_student_whose_top_k_holds_all_its_mass_matches_too():
    h, w, b, labels, teacher, rw = batch(seed=3, peaked=40.0)
    keep, row_w = labels[:, 1:] != IGNORE, rw[:, None].expand(B, T - 1)
    s_top = torch.log_softmax(F.linear(h, w, b)[:, :-1], -1).gather(-1, teacher[0]).logsumexp(-1)
    assert (s_top[keep] > -1e-7).any()  # the "other" bucket is clamped at some positions
    for name, hyper in CASES:
        ref = DIVERGENCES[name](F.linear(h, w, b)[:, :-1], teacher, mask=keep, weight=row_w, **hyper)
        fused = fused_top_k(h[:, :-1], Head(w, b), keep, None, teacher, DIVERGENCES[name], hyper=hyper, weight=row_w,
                            alpha=1.0, chunk=4)  # fmt: skip
        assert gap(fused, ref) < 1e-6 and close(grads(fused, [h, w, b]), grads(ref, [h, w, b])), name


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ce_equals_token_ce_with_and_without_row_weights(chunk):
    h, w, b, labels, _, rw = batch(seed=1)
    keep = labels[:, 1:] != IGNORE
    for weight, ref_w in ((None, None), (rw[:, None].expand(B, T - 1), rw)):
        ref = token_ce(F.linear(h, w, b), labels, ref_w)
        fused = fused_ce(h[:, :-1], Head(w, b), keep, labels[:, 1:], weight, chunk=chunk)
        assert gap(fused, ref) < 1e-6 and close(grads(fused, [h, w, b]), grads(ref, [h, w, b]))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_tsd_selection_and_entropy_term_equal_the_unfused_ones(chunk, alpha):
    h, w, b, labels, teacher, rw = batch(seed=2)
    keep, row_w = labels[:, 1:] != IGNORE, rw[:, None].expand(B, T - 1)
    cfg = DistillConfig(tsd_margin=0.4, tsd_entropy=0.3, alpha=alpha)
    logits = F.linear(h, w, b)
    selected, penalty = _token_selection(logits[:, :-1], teacher, keep, cfg)
    assert 0 < int(selected.sum()) < int(keep.sum())  # the selection keeps some tokens, not all
    ref = forward_kd = DIVERGENCES["kd"](logits[:, :-1], teacher, mask=selected, weight=row_w, temperature=2.0) + penalty
    if alpha < 1:
        ref = alpha * forward_kd + (1 - alpha) * token_ce(logits, labels, rw)
    fused = fused_top_k(h[:, :-1], Head(w, b), keep, labels[:, 1:], teacher, DIVERGENCES["kd"], hyper={"temperature": 2.0},
                        weight=row_w, alpha=alpha, chunk=chunk, select=_chunk_selection(cfg, keep.sum()))  # fmt: skip
    assert gap(fused, ref) < 1e-6 and close(grads(fused, [h, w, b]), grads(ref, [h, w, b]))


@pytest.mark.parametrize("name,hyper", CASES)
@pytest.mark.parametrize("chunk", [4, 1000])
def test_the_dense_divergence_equals_the_unfused_one_from_teacher_logits_or_hidden_states(name, hyper, chunk):
    h, w, b, labels, _, rw = batch(seed=4)
    keep, row_w = labels[:, 1:] != IGNORE, rw[:, None].expand(B, T - 1)
    g = torch.Generator().manual_seed(9)
    t_h, t_w = torch.randn(B, T - 1, 4, generator=g, dtype=torch.float64), torch.randn(V, 4, generator=g, dtype=torch.float64)
    t_logits = t_h @ t_w.T
    ref = DIVERGENCES[name](F.linear(h, w, b)[:, :-1], t_logits, mask=keep, weight=row_w, **hyper)
    ref_grads = grads(ref, [h, w, b])
    for teacher in (t_logits[keep], (t_h[keep], Head(t_w))):
        fused = fused_dense(h[:, :-1], Head(w, b), keep, teacher, DIVERGENCES[name], hyper=hyper, weight=row_w, chunk=chunk)
        assert gap(fused, ref) < 1e-10 and close(grads(fused, [h, w, b]), ref_grads, atol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_the_closed_form_dense_jsd_gives_no_weight_to_tokens_the_teacher_rules_out(beta):
    h, w, b, labels, _, rw = batch(seed=6)
    keep, row_w = labels[:, 1:] != IGNORE, rw[:, None].expand(B, T - 1)
    t_logits = torch.randn(B, T - 1, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t_logits[..., :4] = float("-inf")  # a masked vocabulary: p_t = 0 there
    ref = DIVERGENCES["jsd"](F.linear(h, w, b)[:, :-1], t_logits, mask=keep, weight=row_w, beta=beta)
    fused = fused_dense(h[:, :-1], Head(w, b), keep, t_logits[keep], DIVERGENCES["jsd"], hyper={"beta": beta}, weight=row_w, chunk=4)
    assert torch.isfinite(fused) and gap(fused, ref) < 1e-10
    assert close(grads(fused, [h, w, b]), grads(ref, [h, w, b]), atol=1e-10)


def test_no_kept_token_gives_a_zero_that_still_backpropagates():
    h, w, b, labels, teacher, _ = batch()
    none = torch.zeros(B, T - 1, dtype=torch.bool)
    loss = fused_top_k(h[:, :-1], Head(w, b), none, labels[:, 1:], teacher, DIVERGENCES["kd"], hyper={}, alpha=0.5, chunk=4)
    loss.backward()
    assert float(loss) == 0.0 and float(h.grad.abs().sum()) == 0.0


class Largest(TorchDispatchMode):
    """The most elements of any tensor an op makes (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_the_logits_never_exist_whole_and_prompt_positions_get_none():
    h, w, b, labels, teacher, rw = batch()
    V = 97  # a vocabulary well above the hidden size, so logits are the largest tensors
    w, b = torch.randn(V, 2, dtype=torch.float64, requires_grad=True), torch.zeros(V, dtype=torch.float64, requires_grad=True)
    h = h[..., :2].detach().requires_grad_()
    keep, kept = labels[:, 1:] != IGNORE, int((labels[:, 1:] != IGNORE).sum())

    def largest(chunk):
        with Largest() as seen:
            fused_top_k(h[:, :-1], Head(w, b), keep, labels[:, 1:], teacher, DIVERGENCES["kd"], hyper={}, alpha=0.5,
                        chunk=chunk).backward()  # fmt: skip
        return seen.numel

    assert largest(4) == 4 * V < kept * V  # one chunk of logits at a time, in the forward and the backward
    assert largest(1000) == kept * V < B * (T - 1) * V  # one chunk holding every kept token: still no prompt positions
    with Largest() as seen:
        logits = F.linear(h, w, b)
        (0.5 * DIVERGENCES["kd"](logits[:, :-1], teacher, mask=keep) + 0.5 * token_ce(logits, labels)).backward()
    assert seen.numel >= B * T * V  # the unfused path makes them all


class Vocab:
    """What ``build_lm`` reads of a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 61


MOE = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")  # their grouped expert matmuls take no float64


def tiny(family: str, dtype=torch.float64):
    """A tiny model of ``family`` (float32 for MoE families), without dropout: two forwards agree."""
    if family in ("gpt2", "llama", "qwen2", "mixtral", "qwen2_moe", "olmoe"):
        model = build_lm(family, LMSize(hidden=16, layers=2, heads=2, intermediate=32, context=32, router_aux_loss=0.1), Vocab())
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        extra = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16} if family == "qwen3_moe" else {}
        config = AutoConfig.for_model(family, vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, **extra)  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(torch.float32 if family in MOE else dtype).train()


def lm_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[:, :4], labels[1, 8:] = IGNORE, IGNORE
    top = torch.log_softmax(torch.randn(3, 10, 61, generator=g) * 3, -1).topk(6, -1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "w": torch.tensor([1.0, 2.0, 0.5]),
            "t_ids": top.indices, "t_logprobs": top.values}  # fmt: skip


FAMILIES = ["llama", "qwen2", "gpt2", "mixtral", "qwen2_moe", "olmoe", "mistral", "qwen3", "phi3", "qwen3_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_hidden_states_the_output_layer_receives_reproduce_the_models_logits(family):
    model, b = tiny(family).eval(), lm_batch()
    layer = output_layer(model)
    assert layer is model.get_output_embeddings()
    with torch.no_grad():
        hidden, head = final_hidden(model, layer, input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert head.autocast is None and torch.allclose(head.logits(hidden), logits, atol=1e-6 if family in MOE else 1e-12)


def test_models_the_fused_path_cannot_stand_in_for_keep_the_unfused_one():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=2, intermediate_size=32, head_dim=8, pad_token_id=0))  # fmt: skip
    assert output_layer(gemma) is None  # soft-caps its logits after the head
    assert output_layer(torch.nn.Linear(3, 3)) is None
    model = tiny("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert output_layer(model) is None


def test_the_head_records_and_reuses_the_forwards_autocast():
    """Under autocast (accelerate's bf16) a chunk is projected as the model projected it."""
    model, b = tiny("llama", torch.float32).eval(), lm_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, head = final_hidden(model, output_layer(model), input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert head.autocast == torch.bfloat16 and logits.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(head.logits(hidden), logits)  # outside autocast now, projected in bf16 as the model did


def test_under_bf16_autocast_the_fused_loss_follows_the_unfused_one():
    """accelerate's mixed precision: the model's forward in bf16 autocast, the backward outside it."""
    model, b = tiny("llama", torch.float32), lm_batch()

    def run(chunk):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = top_k_loss(LM_METHODS["kd"], method_cfg(chunk))(model, b)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (fused, g_fused), (unfused, g_unfused) = run(4), run(0)
    assert fused.dtype == unfused.dtype == torch.float32 and gap(fused, unfused) < 1e-3 * float(unfused)
    for k, g in g_unfused.items():
        assert g_fused[k].dtype == g.dtype and (g_fused[k] - g).abs().max() <= 0.03 * g.abs().max(), k


def test_the_closed_form_dense_jsd_in_bf16_follows_float32():
    """bf16 student logits (a bf16 model on GPU): the closed form computes in float32 and hands back bf16 gradients."""
    g = torch.Generator().manual_seed(3)
    h32, w32 = torch.randn(2, 6, 8, generator=g), torch.randn(40, 8, generator=g) * 0.5
    keep, teacher = torch.ones(2, 6, dtype=torch.bool), torch.randn(12, 40, generator=g)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, w = h32.to(dtype, copy=True).requires_grad_(), w32.to(dtype, copy=True).requires_grad_()
        loss = fused_dense(h, Head(w), keep, teacher, DIVERGENCES["jsd"], hyper={"beta": 0.5}, chunk=5)
        loss.backward()
        out[dtype] = (loss.detach(), h.grad, w.grad)
    (l32, dh32, dw32), (l16, dh16, dw16) = out[torch.float32], out[torch.bfloat16]
    assert l16.dtype == torch.float32 and dh16.dtype == dw16.dtype == torch.bfloat16
    assert abs(float(l16 - l32)) < 0.02 * float(l32)
    for a, b in ((dh16, dh32), (dw16, dw32)):
        assert (a.float() - b).abs().max() <= 0.05 * b.abs().max()


def method_cfg(chunk: int, **kw) -> DistillConfig:
    return DistillConfig(alpha=0.5, temperature=2.0, tsd_margin=-0.05, tsd_entropy=0.2, lm=LMConfig(loss_chunk=chunk), **kw)


def loss_and_grads(model, loss_fn, b):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, b)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same(a, b, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    return gap(la, lb) < atol and ga.keys() == gb.keys() and all(torch.allclose(ga[k], gb[k], atol=atol) for k in ga)


@pytest.mark.parametrize("method", ["kd", "reverse-kl", "jsd", "skew-kl", "tvd", "tsd", "mst"])
def test_every_token_level_method_gives_the_unfused_loss_and_gradients_on_a_model(method):
    model, b = tiny("llama"), lm_batch()
    unfused = loss_and_grads(model, top_k_loss(LM_METHODS[method], method_cfg(0, reverse_skew=True)), b)
    for chunk in (3, 7, 512):
        fused = loss_and_grads(model, top_k_loss(LM_METHODS[method], method_cfg(chunk, reverse_skew=True)), b)
        assert same(fused, unfused), (method, chunk)
    assert len(unfused[1]) == len(list(model.parameters()))  # every weight, the tied output layer included, got a gradient


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_an_moe_students_router_aux_loss_still_reaches_the_loss(family):
    model, b = tiny(family), lm_batch()
    aux = RouterAuxLoss(model)

    def with_aux(chunk):
        loss_fn = top_k_loss(LM_METHODS["kd"], method_cfg(chunk))
        return loss_and_grads(model, lambda m, batch: aux.add_to(loss_fn(m, batch)), b)

    plain = loss_and_grads(model, top_k_loss(LM_METHODS["kd"], method_cfg(4)), b)
    fused, unfused = with_aux(4), with_aux(0)
    assert same(fused, unfused, atol=1e-5) and float(fused[0]) > float(plain[0])  # the aux term is in, and the same
    aux.close()


def test_sft_ce_fused_equals_unfused_on_gpt2_and_a_lora_student():
    from stages.config import LoraConfig
    from stages.lm import lora

    b = lm_batch(1)
    for model in (tiny("gpt2"), lora.wrap(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "base")):
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would leave A without gradient
                p.data.normal_(0, 0.1)
        assert output_layer(model) is not None
        unfused = loss_and_grads(model, lambda m, batch: next_token_loss(m, batch, chunk=0), b)
        for chunk in (4, None):
            assert same(loss_and_grads(model, lambda m, batch, c=chunk: next_token_loss(m, batch, chunk=c), b), unfused)
    assert all("lora_" in k for k in unfused[1]) and len(unfused[1]) == 8  # the frozen output layer stays frozen


def test_a_ddp_student_goes_through_its_wrapper(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, b = tiny("llama"), lm_batch()
    unfused = loss_and_grads(model, top_k_loss(LM_METHODS["jsd"], method_cfg(0)), b)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert output_layer(ddp) is model.lm_head
        fused = loss_and_grads(ddp, top_k_loss(LM_METHODS["jsd"], method_cfg(5)), b)
    finally:
        dist.destroy_process_group()
    assert same((fused[0], {k.removeprefix("module."): g for k, g in fused[1].items()}), unfused)


class Served:
    """A teacher as a server offers it: ``score`` only (no in-process ``logits``)."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, prompt_ids, completion_ids, top_k):
        return self.inner.score(prompt_ids, completion_ids, top_k)


@pytest.mark.parametrize("served", [False, True])
def test_on_policy_fused_equals_unfused_against_a_dense_or_a_scored_teacher(served):
    from stages.lm.methods.on_policy import on_policy_loss
    from stages.lm.teachers.transformers_backend import TransformersTeacher

    torch.manual_seed(5)
    teacher = TransformersTeacher("teacher", "cpu", model=tiny("qwen2").eval(), tokenizer=Vocab())
    teacher = Served(teacher) if served else teacher
    model, b = tiny("llama"), lm_batch(2)

    def run(chunk):
        cfg = DistillConfig(lmbda=0.0, beta=0.5, lm=LMConfig(loss_chunk=chunk), teacher=DistillConfig().teacher)
        return loss_and_grads(model, on_policy_loss(LM_METHODS["on-policy"], cfg, teacher, Vocab(), 32), b)

    unfused = run(0)
    assert same(run(3), unfused) and same(run(512), unfused) and float(unfused[0]) > 0


def rows(n: int, seed: int):
    """Encoded rows as ``collate`` takes them: prompt + completion ids, labels, top-k [n_completion, k], weight."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, c = torch.randint(3, 61, (4 + i % 3,), generator=g).tolist(), torch.randint(3, 61, (3 + i % 4,), generator=g).tolist()
        top = torch.log_softmax(torch.randn(len(c), 61, generator=g) * 3, -1).topk(6, -1)
        out.append((p + c, [IGNORE] * len(p) + c, top.indices.numpy(), top.values.numpy(), 1.0 + (i % 2)))
    return out


def test_a_few_kd_steps_through_the_fused_loss_end_at_the_unfused_weights(tmp_path):
    from stages.lm.training import RowSource, fit

    train, dev = rows(24, 0), rows(4, 1)

    def trained(chunk):
        cfg = DistillConfig(method="kd", epochs=1, batch_size=6, lr=0.01, seed=0, lm=LMConfig(loss_chunk=chunk))
        model = tiny("llama", torch.float32)
        source = lambda r: RowSource([lambda: r], [len(r)], lambda x: x)  # noqa: E731
        fit(model, source(train), source(dev), cfg, tmp_path / f"c{chunk}", pad_id=0, device=torch.device("cpu"),
            loss_fn=top_k_loss(LM_METHODS["kd"], cfg))  # fmt: skip
        return model.state_dict()

    start, fused, unfused = tiny("llama", torch.float32).state_dict(), trained(8), trained(0)
    assert all((fused[k] - unfused[k]).abs().max() < 1e-5 for k in unfused)
    assert any((unfused[k] - start[k]).abs().max() > 1e-3 for k in unfused)  # it trained
