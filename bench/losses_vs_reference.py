"""Our logit divergences vs TRL's GKD reference, on the same seeded random tensors.

Reference: ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (static method).

Exact mapping (no mask / weight), for 2-D tensors ``[N, V]``::

    forward_kl(s, t, temperature=T)      == T**2 * ref(s, t, beta=0,   temperature=T)
    jsd(s, t, beta=b, temperature=T)     == T**2 * ref(s, t, beta=b,   temperature=T)
    jsd(s, t, beta=1, temperature=T)     == T**2 * ref(s, t, beta=1,   temperature=T)

- TRL does not apply the Hinton T^2 factor; ours does, hence ``T**2 *``.
- TRL's ``reduction="batchmean"`` without labels divides the summed per-element divergence
  by ``size(0)``. On 2-D ``[N, V]`` input that is N positions, i.e. our mean over positions.
  (On 3-D ``[B, S, V]`` it would divide by B only, a factor S off; we never do that unmasked.)
- With a mask, ``ref(..., labels=L)`` where ``L = -100`` at masked positions gathers the valid
  rows and divides by ``mask.sum()``, i.e. exactly our ``mask=`` mean; the masked case uses
  3-D ``[B, S, V]`` tensors for that reason.
- TRL's ``F.kl_div(input, target, log_target=True)`` is ``KL(target || input)``: beta=0 is
  ``KL(p_t || p_s)`` and beta=1 is ``KL(p_s || p_t)``, matching ours.

Both sides are compared on float64 inputs (the 1e-5 claim; ours keeps float32/float64 as is and
only upcasts half precision) and on float32 inputs (float32 round-off, reported too).
Gradients are w.r.t. the student logits (the teacher is a constant).
Timings are forward + backward, median of REPEAT calls, ours and reference in one process.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from bench.harness import emit, timeit  # noqa: E402
from stages.losses.logits import forward_kl, jsd  # noqa: E402

NAME = "losses_vs_reference"
TOL = 1e-5
SEED = 0
REPEAT, WARMUP = 5, 1
# (label, shape); last dim is the vocabulary. Kept small: the machine is 2 shared cores.
SHAPES = [("lm", (2048, 4096)), ("classifier", (4096, 10))]
MASKED_SHAPE = ("lm_masked", (4, 256, 1024))
LOGIT_SCALE = 3.0  # peaky-ish distributions, like real logits


def _cases():
    """(case name, params, ours(s, t, mask), reference(s, t, labels))."""
    return [
        (
            "forward_kl",
            {"temperature": 2.0},
            lambda s, t, m: forward_kl(s, t, temperature=2.0, mask=m),
            lambda s, t, lab: 2.0**2 * _ref(s, t, labels=lab, beta=0.0, temperature=2.0),
        ),
        (
            "jsd",
            {"beta": 0.5, "temperature": 1.0},
            lambda s, t, m: jsd(s, t, beta=0.5, temperature=1.0, mask=m),
            lambda s, t, lab: _ref(s, t, labels=lab, beta=0.5, temperature=1.0),
        ),
        (
            "jsd",
            {"beta": 1.0, "temperature": 1.0},
            lambda s, t, m: jsd(s, t, beta=1.0, temperature=1.0, mask=m),
            lambda s, t, lab: _ref(s, t, labels=lab, beta=1.0, temperature=1.0),
        ),
    ]


def _ref(s, t, **kw):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(s, t, reduction="batchmean", **kw)


def _loss_and_grad(fn, student, teacher, aux):
    x = student.detach().clone().requires_grad_(True)
    loss = fn(x, teacher, aux)
    loss.backward()
    return loss.detach(), x.grad


def _compare(ours, ref, student, teacher, mask, labels, time_it):
    out = {}
    for dtype in (torch.float64, torch.float32):
        s, t = student.to(dtype), teacher.to(dtype)
        lo, go = _loss_and_grad(ours, s, t, mask)
        lr, gr = _loss_and_grad(ref, s, t, labels)
        out[str(dtype).removeprefix("torch.")] = {
            "loss_ours": lo.item(),
            "loss_ref": lr.item(),
            "loss_abs_diff": (lo.double() - lr.double()).abs().item(),
            "grad_max_abs_diff": (go.double() - gr.double()).abs().max().item(),
            "grad_max_abs": gr.abs().max().item(),
        }
    if time_it:
        s, t = student.float(), teacher.float()
        t_ours = timeit(lambda: _loss_and_grad(ours, s, t, mask), REPEAT, WARMUP)
        t_ref = timeit(lambda: _loss_and_grad(ref, s, t, labels), REPEAT, WARMUP)
        out.update(time_ours_s=round(t_ours, 5), time_ref_s=round(t_ref, 5), time_ratio=round(t_ours / t_ref, 3))
    return out


def main() -> int:
    try:
        import trl
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except ImportError as e:
        emit(NAME, error="install the bench extra: pip install -e '.[bench]'", detail=str(e))
        return 2

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    gen = torch.Generator().manual_seed(SEED)
    cases = []
    for label, shape in [*SHAPES, MASKED_SHAPE]:
        student = LOGIT_SCALE * torch.randn(shape, generator=gen, dtype=torch.float64)
        teacher = LOGIT_SCALE * torch.randn(shape, generator=gen, dtype=torch.float64)
        mask = labels = None
        if label == MASKED_SHAPE[0]:
            mask = torch.rand(shape[:-1], generator=gen) < 0.7
            labels = torch.where(mask, 0, -100)
        for case, params, ours, ref in _cases():
            res = _compare(ours, ref, student, teacher, mask, labels, time_it=mask is None)
            cases.append({"case": case, "params": params, "shape": list(shape), "masked": mask is not None, **res})

    max_abs = max(max(c[d]["loss_abs_diff"], c[d]["grad_max_abs_diff"]) for c in cases for d in ("float64", "float32"))
    emit(
        NAME,
        reference=f"trl {trl.__version__} GKDTrainer.generalized_jsd_loss",
        threads=torch.get_num_threads(),
        repeat=REPEAT,
        cases=cases,
        max_abs_diff=max_abs,
        **{"agrees_to_1e-5": max_abs <= TOL},
    )
    return 0 if max_abs <= TOL else 1


if __name__ == "__main__":
    raise SystemExit(main())
