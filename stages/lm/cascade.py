"""`distil cascade` for language models: in-context distillation (ICD) with
self-consistency cascades (METHODS.md section 6).

The student answers test queries, optionally with the k teacher demonstrations most like
the query in its prompt (``stages.lm.icd.bank``); a self-consistency policy samples it n times
and defers to the teacher when the majority's share of the votes (unparsable answers never
vote, but count in n) is under the threshold. The threshold is calibrated on dev by a sweep
over every achievable value k/n (``cascade_cost.sweep``). Costs are tokens per model, priced
or in FLOPs, against the teacher answering every test query greedily (measured: its answers
also serve the deferred queries, so a deferral costs exactly what the teacher spent on it).

Adaptive sampling draws a query's samples one round at a time (the first round as many as
the earliest possible stop needs) and stops at the first of:

- certain: the majority holds a share >= threshold of n and cannot be overtaken (keep), or
  can no longer reach it (defer); up to here it routes exactly as all n samples would;
- confident (``stop_confidence`` < 1): the leader beats the runner-up with posterior
  probability >= stop_confidence, and the query is kept when the leader's share of the
  samples drawn so far is >= threshold. This is Adaptive-Consistency's stopping rule
  (Aggarwal et al., 2023, "Let's Sample Step by Step", section 3, Beta criterion): with a
  uniform prior the leader's share p of the top two answers is Beta(v1 + 1, v2 + 1) and
  P(p > 1/2) = P(Binomial(v1 + v2 + 1, 1/2) <= v1). Four unanimous samples give 31/32.
  Optimal Self-Consistency analyses this family of dynamic allocations; its Blend-ASC, which
  spreads one budget over all queries of a batch instead of stopping each alone, is the
  ``blend-asc`` policy (``stages.lm.blend_asc``).

Every rule is a function of the stream of samples, so dev calibration replays one stream of
n samples per query for every threshold. Votes are counted by ``stages.lm.scoring`` (the
one majority vote and scorer of the LM commands); ``run`` is a sequence of named steps
(bank, models, fixed or calibrated policy, routing, outputs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from stages.config import CascadeConfig, DataConfig
from stages.errors import DistilError
from stages.lm.cascade_cost import LM, Sampler, break_even
from stages.lm.scoring import Scorer, leader_wins, majority, scorer, tally, vote_counts, winner

if TYPE_CHECKING:
    from stages.lm.icd.bank import Bank

LM_POLICIES = {
    "student": "the student alone, greedy",
    "teacher": "the teacher alone, greedy (the reference every cost is compared with)",
    "sc-cascade": "n student samples; the majority answers when its share of the n votes >= threshold, else the teacher",
    "icd": "the student, greedy, with the k most similar teacher demonstrations in its prompt",
    "icd-sc-cascade": "in-context distillation + self-consistency cascade (the paper's method)",
    "adaptive": "student samples one at a time, stopping once the vote is decided or cannot reach the threshold",
    "weighted-vote": "student and --model samples vote, each model weighted by its own agreement; the teacher is not called",
    "blend-asc": "sample_budget student samples per query on average, spent on the least decided queries of each batch; "
    "the majority answers, the teacher is not called (Blend-ASC)",
}
THRESHOLD_POLICIES = ("sc-cascade", "icd-sc-cascade", "adaptive")
ALWAYS_DEFER = 1.0 + 1e-6
"""Above any agreement: every query goes to the teacher."""


def uses_demos(policy: str, demos: int) -> bool:
    """Whether the policy puts teacher demonstrations in the student's prompt."""
    return policy in ("icd", "icd-sc-cascade") or (policy in ("adaptive", "weighted-vote", "blend-asc") and demos > 0)


# ---- votes ---------------------------------------------------------------------------------


def meets(votes: int, n: int, threshold: float) -> bool:
    """votes / n >= threshold, robust to the rounding of threshold = k / n."""
    return votes >= threshold * n - 1e-9


def adaptive_state(answers: list[str | None], n: int, threshold: float, stop_confidence: float = 1.0) -> str | None:
    """After ``len(answers)`` of at most ``n`` samples: "keep", "defer", or None (draw
    another sample); see the module docstring for the rules."""
    counts = vote_counts(answers) + [0, 0]
    lead, second, drawn = counts[0], counts[1], len(answers)
    left = n - drawn
    if not meets(lead + left, n, threshold):
        return "defer"
    if meets(lead, n, threshold) and lead > second + left:
        return "keep"
    if left == 0:
        return "keep" if meets(lead, n, threshold) else "defer"
    if stop_confidence < 1.0 and lead > 0 and leader_wins(lead, second) >= stop_confidence:
        return "keep" if meets(lead, drawn, threshold) else "defer"
    return None


def first_round(n: int, threshold: float, stop_confidence: float) -> int:
    """Samples of adaptive's first round: the fewest after which an agreeing stream stops
    (one call reads the prompt once for all of them)."""
    return next((m for m in range(1, n + 1) if adaptive_state(["x"] * m, n, threshold, stop_confidence)), n)


def decide(policy: str, answers: list[str | None], n: int, threshold: float, stop_confidence: float = 1.0) -> tuple[bool, int]:
    """(keep, samples used) of a threshold policy on a stream of ``n`` sampled answers."""
    if policy == "adaptive":
        start = first_round(n, threshold, stop_confidence) if meets(n, n, threshold) else 0
        for m in range(start, n + 1):
            state = adaptive_state(answers[:m], n, threshold, stop_confidence)
            if state is not None:
                return state == "keep", m
    return meets(majority(answers)[1], n, threshold), n


def rounds(used: ArrayLike, n: int, threshold: float, stop_confidence: float) -> np.ndarray:
    """Generate calls (prompt reads) of adaptive queries that drew ``used`` samples."""
    used = np.asarray(used)
    return np.where(used > 0, used - first_round(n, threshold, stop_confidence) + 1, 0)


def weighted_vote(per_model: list[list[str | None]]) -> tuple[str | None, float]:
    """(answer, share): every model's samples vote, each weighted by that model's own
    agreement (its majority's share of its samples); share = the winner's weighted votes over
    all weight. Ties go to the answer seen first (the student's samples come first)."""
    flat, weights, total = [], [], 0.0
    for answers in per_model:
        weight = majority(answers)[1] / max(len(answers), 1)
        total += weight
        flat += answers
        weights += [weight / len(answers) for _ in answers]
    best = winner(tally(flat, weights))
    if best is None or total <= 0:
        return None, 0.0
    return best.answer, best.votes / total


def student_step(policy: str, n: int, threshold: float, temperature: float, sampler: Sampler, student: LM,
                 voters: list[LM], prompts: list[str], stop_confidence: float = 1.0, budget: float = 0.0) -> list[dict]:  # fmt: skip
    """The student side of one step of test queries: per query its sampled answers, the
    student's answer, agreement, whether it keeps the query, samples used, tokens, seconds and
    the voters' cost (weighted-vote). ``budget``: blend-asc's mean samples per query (0 = n)."""
    empty = {"answers": [], "texts": [], "student_answer": None, "agreement": None, "keep": False, "used": 0, "s_prompt": 0,
             "s_completion": 0, "seconds": 0.0, "v_prompt": 0, "v_completion": 0, "v_cost": 0.0}  # fmt: skip
    out = [dict(empty) for _ in prompts]
    if policy == "teacher" or not prompts:
        return out
    if policy == "blend-asc":
        from stages.lm.blend_asc import blend_step

        return blend_step(n, budget or n, temperature, sampler, student, prompts, out)
    if policy == "adaptive":
        streams: list[list[str | None]] = [[] for _ in prompts]
        state = [adaptive_state([], n, threshold, stop_confidence) for _ in prompts]
        draw, round_ = first_round(n, threshold, stop_confidence), 0
        while todo := [i for i, s in enumerate(state) if s is None]:
            d = sampler.draw(student, [prompts[i] for i in todo], draw, temperature, round_)
            round_ += 1
            for j, i in enumerate(todo):
                streams[i].extend(d.answers[j])
                o = out[i]
                o["texts"] = o["texts"] + d.texts[j]
                o["s_prompt"] += d.prompt_tokens[j]  # every round is a call that reads the prompt again
                o["s_completion"] += sum(d.completion_tokens[j])
                o["seconds"] += d.seconds[j]
                state[i] = adaptive_state(streams[i], n, threshold, stop_confidence)
            draw = 1
        for o, answers, s in zip(out, streams, state, strict=True):
            o["student_answer"], votes = majority(answers)
            o.update(answers=answers, agreement=votes / max(len(answers), 1), keep=s == "keep", used=len(answers))
        return out
    greedy = policy in ("student", "icd")
    k, temp = (1, 0.0) if greedy else (n, temperature)
    d = sampler.draw(student, prompts, k, temp)
    draws = [(v, sampler.draw(v, prompts, n, temperature)) for v in voters] if policy == "weighted-vote" else []
    for i, o in enumerate(out):
        answer, votes = majority(d.answers[i])
        agreement, keep = votes / k, greedy or policy == "weighted-vote" or meets(votes, n, threshold)
        if policy == "weighted-vote":
            answer, agreement = weighted_vote([d.answers[i]] + [vd.answers[i] for _, vd in draws])
        o.update(answers=list(d.answers[i]) + [a for _, vd in draws for a in vd.answers[i]], texts=list(d.texts[i]), student_answer=answer,
                 agreement=agreement, keep=keep, used=k, s_prompt=d.prompt_tokens[i], s_completion=sum(d.completion_tokens[i]),
                 seconds=d.seconds[i] + sum(vd.seconds[i] for _, vd in draws))  # fmt: skip
        for v, vd in draws:
            p, c = vd.prompt_tokens[i], sum(vd.completion_tokens[i])
            o["v_prompt"] += p
            o["v_completion"] += c
            o["v_cost"] += float(v.pricer(p, c))
    return out


# ---- the run -------------------------------------------------------------------------------


def _check(cfg: CascadeConfig, policy: str, models: list, policy_file: Path | None) -> None:
    """Every option combination that cannot work, refused before anything is loaded."""
    if policy not in LM_POLICIES:
        raise DistilError(f"unknown policy '{policy}' for language models; choose one of {', '.join(LM_POLICIES)}")
    if min(cfg.samples, cfg.max_new_tokens, cfg.batch_size, cfg.query_batch) < 1 or cfg.demos < 0 or cfg.budget < 0:
        raise DistilError("samples, max_new_tokens, batch_size and query_batch must be >= 1; demos and budget >= 0")
    sampled = policy in (*THRESHOLD_POLICIES, "weighted-vote", "blend-asc")
    if sampled and cfg.samples > 1 and cfg.temperature <= 0:
        raise DistilError(f"policy {policy} samples {cfg.samples} answers per query; set temperature > 0")
    if policy.startswith("icd") and cfg.demos < 1:
        raise DistilError(f"policy {policy} puts demonstrations in the prompt; set demos >= 1")
    if (policy == "weighted-vote") != bool(models):
        raise DistilError("weighted-vote needs --model (repeatable) voters besides the student; other policies take no --model")
    if cfg.online and not (policy in ("icd-sc-cascade", "adaptive") and uses_demos(policy, cfg.demos)):
        raise DistilError("--online feeds deferred answers to the bank: use icd-sc-cascade, or adaptive with demos >= 1")
    if cfg.sample_budget and (policy != "blend-asc" or not 1 <= cfg.sample_budget <= cfg.samples):
        raise DistilError(f"sample_budget is blend-asc's mean samples per query, in [1, samples = {cfg.samples}]; got "
                          f"{cfg.sample_budget} for policy {policy}")  # fmt: skip
    if cfg.retriever not in ("dense", "bm25", "auto"):
        raise DistilError(f"unknown retriever '{cfg.retriever}'; choose dense, bm25 or auto")
    if cfg.threshold != -1 and not 0 <= cfg.threshold <= 1:
        raise DistilError(
            f"threshold must be within [0, 1] (the share of agreeing samples), or -1 to calibrate on dev; got {cfg.threshold}"
        )
    if not 0.5 < cfg.stop_confidence <= 1:
        raise DistilError(
            f"stop_confidence must be in (0.5, 1] (1 = stop only when all n samples could not change the decision); got {cfg.stop_confidence}"
        )
    if (cfg.threshold >= 0 or cfg.budget > 0) and policy not in THRESHOLD_POLICIES:
        raise DistilError(f"threshold and budget apply to {', '.join(THRESHOLD_POLICIES)}, not {policy}")
    if sum([cfg.threshold >= 0, policy_file is not None, cfg.budget > 0]) > 1:
        raise DistilError("threshold, --policy-file and budget each fix the threshold; pass one of them")


def _from_file(policy_file: Path, policy: str, samples: int) -> dict:
    """A policy written by an earlier LM cascade, checked against this run."""
    try:
        found = json.loads(Path(policy_file).read_text())
        float(found["threshold"] if found["threshold"] is not None else 0.0)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DistilError(f"{policy_file} is not a cascade policy file; calibrate one with `distil cascade`") from None
    if found.get("policy") != policy:
        raise DistilError(f"{policy_file} calibrates policy '{found.get('policy')}', not '{policy}'; pass a matching --policy")
    if policy in THRESHOLD_POLICIES and (found["threshold"] is None or found.get("samples") != samples):
        raise DistilError(f"{policy_file} was calibrated with samples={found.get('samples')}; set samples to match")
    return found


def _calibrate(
    cfg: CascadeConfig, policy: str, lms: dict[str, LM], bank: Bank | None, rows: list[dict], sampler: Sampler, score: Scorer
) -> tuple[float, list[dict], dict]:
    """Sweep every achievable threshold on dev from one stream of n samples per query."""
    from stages.lm.cascade_cost import sweep

    if not rows:
        raise DistilError("the task has no dev prompts to calibrate on; pass --policy-file or set threshold")
    n, plain = cfg.samples, [r["prompt"] for r in rows]
    prompts = [bank.prompt(d, p) for d, p in zip(bank.retrieve(plain, cfg.demos), plain, strict=True)] if bank else plain
    s, t = sampler.draw(lms["student"], prompts, n, cfg.temperature), sampler.draw(lms["teacher"], plain, 1, 0.0)
    t_cost = lms["teacher"].pricer(t.prompt_tokens, [sum(c) for c in t.completion_tokens])
    thresholds = np.array([k / n for k in range(n + 1)] + [ALWAYS_DEFER])
    stop = cfg.stop_confidence
    decided = [[decide(policy, s.answers[i], n, thr, stop) for i in range(len(rows))] for thr in thresholds]
    keep, used = np.array([[k for k, _ in d] for d in decided]), np.array([[u for _, u in d] for d in decided])
    # adaptive reads the prompt once per round
    calls = (
        np.stack([rounds(u, n, thr, stop) for u, thr in zip(used, thresholds, strict=True)]) if policy == "adaptive" else np.full_like(used, 1)
    )
    done = np.array([np.concatenate([[0], np.cumsum(c)]) for c in s.completion_tokens])  # [N, n + 1]
    s_cost = lms["student"].pricer(np.array(s.prompt_tokens) * calls, np.take_along_axis(done.T, used, axis=0))
    cost = s_cost + np.where(keep, 0.0, t_cost)
    nan = float("nan")
    s_score = np.array([nan if (v := score(r, majority(a)[0])) is None else v for r, a in zip(rows, s.answers, strict=True)])
    t_score = np.array([nan if (v := score(r, a[0])) is None else v for r, a in zip(rows, t.answers, strict=True)])
    relative = cfg.target_accuracy < 0
    j, curve = sweep(thresholds, keep, s_score, t_score, cost, used, float(t_cost.sum()),
                     target=None if relative else cfg.target_accuracy, margin=cfg.margin if relative else None,
                     budget=cfg.budget, level=cfg.confidence, seed=cfg.seed)  # fmt: skip
    dev = {**curve[j], "teacher_accuracy": float(np.nanmean(t_score)), "student_accuracy": float(np.nanmean(s_score)),
           "target_accuracy": float(np.nanmean(t_score)) - cfg.margin if relative else cfg.target_accuracy}  # fmt: skip
    return float(thresholds[j]), curve, dev


def summary_line(m: dict) -> str:
    """One line for a terminal: accuracy against the teacher's, cost against teacher-only."""
    teacher = f" (teacher alone {m['teacher_accuracy']:.3f})" if m.get("teacher_accuracy") is not None else ""
    return (f"LM cascade {m['policy']}: accuracy {m['accuracy']:.3f}{teacher}, cost {m['cost_vs_teacher']:.2f}x teacher-only "
            f"({m['cost_unit']}), teacher answers {m['teacher_rate']:.0%} of {m['queries']} queries, "
            f"{m['samples_per_query']:.1f} student samples per query")  # fmt: skip


def run(cfg: CascadeConfig, student: Path, teacher: Path, data: str | Path, out: Path, *, data_cfg: DataConfig | None = None,
        policy_file: Path | None = None, device: str = "auto", models: list[Path] | tuple = (), progress: bool = True) -> Path:  # fmt: skip
    """Route the test queries of LM teacher data's task; write decisions, metrics, policy,
    calibration curve and the demonstration bank to ``out`` (see the module docstring)."""
    from stages.artifacts import Output, artifact_hash, fingerprint
    from stages.config import to_dict
    from stages.devices import resolve_device
    from stages.lm.icd.bank import Bank, read_teacher_data, task_queries
    from stages.progress import progress_bar

    policy, models = ("icd-sc-cascade" if cfg.policy == "auto" else cfg.policy), list(models)
    _check(cfg, policy, models, policy_file)
    dev_ = resolve_device(device)
    train, manifest = read_teacher_data(data)
    queries, task = task_queries(manifest)
    bank_rows = _bank_rows(cfg, policy, data, queries, train)
    fixed = _from_file(policy_file, policy, cfg.samples) if policy_file is not None else None
    paths = {"student": student, "teacher": teacher, **{f"model{i + 1}": m for i, m in enumerate(models)}}
    lms, ids, unit = _load(cfg, paths, dev_)
    fixed, base = _fixed_policy(cfg, policy, fixed, ids, policy_file)
    params = {"cascade": to_dict(cfg), "data": manifest.get("params", {}).get("data", {})}
    inputs = {
        **{n: i["sha256"] for n, i in ids.items()},
        "data": artifact_hash(Path(data)),
        "policy": json.dumps(fixed, sort_keys=True),
    }
    score, output = scorer(task), Output(out, fingerprint("cascade", params, inputs))
    gen = {"batch_size": cfg.batch_size, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "device": dev_,
           "per_query": cfg.seed_per_query}  # fmt: skip
    with output as work, progress_bar(progress) as bar:
        bank = Bank(bank_rows, kind=cfg.retriever, embedder=cfg.embedder, device=str(dev_)) if bank_rows is not None else None
        curve: list[dict] = []
        if fixed is None:
            job = bar.add_task("calibrate on dev", total=1, info=f"{len(queries['dev'])} queries")
            threshold, curve, dev = _calibrate(
                cfg, policy, lms, bank, queries["dev"], Sampler(seed=cfg.seed, stream=0, **gen), score
            )
            bar.update(job, advance=1)
            fixed = {**base, "threshold": threshold, "dev": dev, "budget": cfg.budget, "confidence": cfg.confidence}
        sampler = Sampler(seed=cfg.seed, stream=1, **gen)
        records, metrics = _route(cfg, policy, fixed, lms, bank, queries["test"], sampler, score, unit, bar)
        if bank is not None:
            metrics.update(_bank_metrics(bank, train, lms["teacher"]))
        n = len(records)
        metrics["break_even_queries"] = break_even(
            metrics.get("bank_cost", 0.0), metrics["teacher_only_cost"] / n, metrics["cost"] / n
        )
        _write(work, records, metrics, fixed, curve, bank, params=params, inputs=inputs, ids=ids, task=manifest.get("task", {}))
    return output.commit()


def _bank_rows(cfg: CascadeConfig, policy: str, data, queries: dict, train: list[dict]) -> list[dict] | None:
    """The demonstrations of the bank when the policy uses one (None otherwise), checked
    against the test queries to route and the ``demos`` each prompt takes."""
    from stages.lm.icd.bank import demonstrations

    if not queries["test"]:
        raise DistilError(f"the task of {data} has no test prompts; the cascade runs on the test split")
    if uses_demos(policy, cfg.demos) and not train:
        raise DistilError(f"{data} has no train-split rows to build the demonstration bank from; generate teacher data for train")
    bank_rows = demonstrations(train, cfg.bank_verified) if uses_demos(policy, cfg.demos) else None
    if bank_rows is not None and cfg.demos > len(bank_rows):
        which = " the task scored correct (bank_verified)" if cfg.bank_verified else ""
        raise DistilError(f"demos={cfg.demos} but {data} yields {len(bank_rows)} demonstration(s){which} from its train "
                          "split; lower demos or generate teacher data for more train prompts")  # fmt: skip
    return bank_rows


def _load(cfg: CascadeConfig, paths: dict[str, Path], device) -> tuple[dict[str, LM], dict[str, dict], str]:
    """(name -> ``LM`` over its ``Teacher`` backend, priced; name -> model identity; cost unit).
    Only the teacher may be served (``--teacher http://...``, ``cascade.teacher``)."""
    from stages.config import TeacherConfig
    from stages.lm.cascade_cost import load_model, pricers

    loaded = {name: load_model(p, name, device, cfg.teacher if name == "teacher" else TeacherConfig()) for name, p in paths.items()}
    prices, unit = pricers(cfg.costs, {name: x[1] for name, x in loaded.items()})
    lms = {name: LM(name, x[0], prices[name], x[0].context) for name, x in loaded.items()}
    ids = {name: {k: v for k, v in x[0].identity.items() if k in ("path", "sha256", "url", "model")} for name, x in loaded.items()}
    return lms, ids, unit


def _fixed_policy(cfg: CascadeConfig, policy: str, fixed: dict | None, ids: dict[str, dict], policy_file: Path | None):
    """(the policy fixed before dev, or None to calibrate on dev; what every policy file records).
    A policy file must have been calibrated for this very student and teacher."""
    if fixed is not None and any(fixed.get(m, {}).get("sha256") != ids[m]["sha256"] for m in ("student", "teacher")):
        raise DistilError(f"{policy_file} was calibrated for student {fixed.get('student', {}).get('path')} and teacher "
                          f"{fixed.get('teacher', {}).get('path')}, not these models; calibrate a policy for this pair")  # fmt: skip
    base = {"policy": policy, "samples": cfg.samples, "student": ids["student"], "teacher": ids["teacher"],
            "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                         "stop_confidence": cfg.stop_confidence, "seed_per_query": cfg.seed_per_query, "demos": cfg.demos,
                         "sample_budget": cfg.sample_budget},
            "costs": cfg.costs}  # fmt: skip
    if fixed is None and (policy not in THRESHOLD_POLICIES or cfg.threshold >= 0):
        fixed = {**base, "threshold": cfg.threshold if policy in THRESHOLD_POLICIES else None, "dev": None}
    return fixed, base


def _route(cfg: CascadeConfig, policy: str, fixed: dict, lms: dict[str, LM], bank: Bank | None, rows: list[dict],
           sampler: Sampler, score: Scorer, unit: str, bar) -> tuple[list[dict], dict]:  # fmt: skip
    """Route the test queries a batch at a time: (one decision record per query, metrics).
    The teacher answers every query first, the reference the costs compare with; its
    answers also serve the deferred queries."""
    from stages.lm.cascade_cost import summarise
    from stages.lm.icd.bank import demo

    threshold = fixed["threshold"] if fixed["threshold"] is not None else 0.0
    plain = [r["prompt"] for r in rows]
    job = bar.add_task("teacher reference", total=1, info=f"{len(rows)} queries")
    ref = sampler.draw(lms["teacher"], plain, 1, 0.0)
    bar.update(job, advance=1)
    t_cost = lms["teacher"].pricer(ref.prompt_tokens, [sum(c) for c in ref.completion_tokens])
    job, records = bar.add_task(f"cascade {policy}", total=len(rows), info=""), []
    voters = [lm for name, lm in lms.items() if name.startswith("model")]
    for lo in range(0, len(rows), cfg.query_batch):
        span = range(lo, min(len(rows), lo + cfg.query_batch))
        demos = bank.retrieve([plain[i] for i in span], cfg.demos) if bank is not None else [[] for _ in span]
        prompts = [bank.prompt(d, plain[i]) if bank is not None else plain[i] for i, d in zip(span, demos, strict=True)]
        step = student_step(policy, cfg.samples, threshold, cfg.temperature, sampler, lms["student"], voters, prompts,
                            cfg.stop_confidence, cfg.sample_budget)  # fmt: skip
        online = []
        for i, d, o in zip(span, demos, step, strict=True):
            records.append(_record(rows[i], d, o, ref, i, t_cost, lms["student"], score))
            if cfg.online and not o["keep"] and ref.answers[i][0] is not None:  # a deferred query's teacher answer
                online.append(demo(rows[i]["id"], rows[i]["split"], "online", rows[i]["prompt"], ref.answers[i][0]))
        if bank is not None:
            bank.add(online)
        bar.update(job, advance=len(span))
    metrics = summarise(records, policy=policy, threshold=fixed["threshold"], teacher_cost=t_cost,
                        teacher_seconds=ref.seconds, unit=unit, samples=cfg.samples)  # fmt: skip
    return records, metrics


def _record(r: dict, demos: list[int], o: dict, ref, i: int, t_cost: np.ndarray, student: LM, score: Scorer) -> dict:
    """The decision record of query ``r`` (row ``i`` of the teacher reference ``ref``): its
    route, answers, tokens and cost; ``_s`` / ``_t`` are the student's and the teacher's
    scores, for the metrics only."""
    deferred, t_answer, t_tok = not o["keep"], ref.answers[i][0], sum(ref.completion_tokens[i])
    answer = t_answer if deferred else o["student_answer"]
    sc = score(r, answer)
    return {
        "id": r["id"], "split": r["split"], "item": r["item"], "gold": r["answer"], "route": "teacher" if deferred else "student",
        "answers": o["answers"], "agreement": o["agreement"], "samples_used": o["used"], "demos_used": demos,
        "student_prompt_tokens": o["s_prompt"], "student_completion_tokens": o["s_completion"],
        "teacher_prompt_tokens": ref.prompt_tokens[i] if deferred else 0, "teacher_completion_tokens": t_tok if deferred else 0,
        "voter_prompt_tokens": o["v_prompt"], "voter_completion_tokens": o["v_completion"],
        "cost": float(student.pricer(o["s_prompt"], o["s_completion"])) + o["v_cost"] + (float(t_cost[i]) if deferred else 0.0),
        "seconds": o["seconds"] + (ref.seconds[i] if deferred else 0.0), "student_answer": o["student_answer"],
        "answer": answer, "score": sc, "correct": None if sc is None else sc >= 1.0,
        "_s": score(r, o["student_answer"]), "_t": score(r, t_answer),
    }  # fmt: skip


def _bank_metrics(bank: Bank, train: list[dict], teacher: LM) -> dict:
    """The bank's size, what ``--online`` added, and what the teacher spent building it."""
    from stages.lm.icd.bank import build_tokens

    if teacher.tokenizer is None:
        raise DistilError("costing the demonstration bank counts the teacher's tokens: set cascade.teacher.tokenizer to its tokenizer")
    spent = build_tokens(train, lambda texts: [len(x) for x in teacher.tokenizer(texts, add_special_tokens=False)["input_ids"]])
    return {"bank_size": bank.initial, "bank_added": len(bank) - bank.initial, "bank_cost": float(teacher.pricer(*spent)),
            "retriever": bank.index.kind}  # fmt: skip


def _write(work: Path, records: list[dict], metrics: dict, fixed: dict, curve: list[dict], bank: Bank | None, *,
           params: dict, inputs: dict, ids: dict, task: dict) -> None:  # fmt: skip
    """decisions/, bank/, policy.json, metrics.json, summary.txt, the calibration curve, the
    outcome tables and the manifests. Routing is redone whole: a crashed run's partial
    decisions and bank are not resumed."""
    from stages.artifacts import LM_CASCADE_DECISIONS, Kind, TableWriter, write_json, write_manifest
    from stages.lm.cascade_cost import write_curve, write_outcome_plots

    decisions, n = work / "decisions", len(records)
    for stale in (decisions, work / "bank"):
        shutil.rmtree(stale, ignore_errors=True)
    decisions.mkdir()
    TableWriter(decisions, LM_CASCADE_DECISIONS).write({k: [r[k] for r in records] for k in LM_CASCADE_DECISIONS.names})
    if bank is not None:
        bank.save(work / "bank", params=params, inputs=inputs)
    write_json(work / "policy.json", fixed)
    write_json(work / "metrics.json", metrics)
    (work / "summary.txt").write_text(summary_line(metrics) + "\n")
    write_curve(work / "calibration.csv", curve)
    write_outcome_plots(work, records)
    write_manifest(decisions, kind=Kind.LM_CASCADE_DECISIONS, params=params, inputs=inputs, rows=n, model=ids)
    write_manifest(work, kind=Kind.LM_CASCADE, params=params, inputs=inputs, rows=n, model=ids,
                   extra={"task": task, "metrics": metrics})  # fmt: skip
