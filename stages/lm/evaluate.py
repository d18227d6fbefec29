"""`distil evaluate` for language models.

Greedy completions on the split's prompts give ``accuracy`` (``stages.lm.scoring.scorer``:
the task's own scorer; normalised exact match for user prompt tables), the share of
unparsable answers, parameters, prompts/s and tokens/s. With ``samples`` > 1 it also samples
n completions per prompt: ``maj@n`` (the majority answer, ``stages.lm.scoring.majority``, is
right), ``pass@n`` (any answer is right) and ``vote_ece``, the calibration of the majority's
vote share as a confidence (15 bins).
On LM teacher data, ``agreement_with_teacher`` compares the greedy answer with the
teacher's majority answer for the same prompt. With ``decode: scmoe`` (MoE models only)
every completion is decoded by self-contrast (``stages.lm.moe.scmoe``): ``accuracy`` is then the
greedy SCMoE accuracy, and ``decode`` with the ``scmoe_*`` settings is recorded per model.

MoE models are also measured for how they route (``stages.lm.moe.metrics``): the greedy
pass records every MoE layer's experts (``stages.lm.moe.routing``) over the whole sequence, prompt
and completion (each input position once: the paper these metrics come from measures
whole texts, and prompts are most of the tokens here), and adds ``routing_load_entropy``,
``routing_top1_repeat``, ``routing_srp``, ``routing_sch`` and friends to the model's
metrics, with segment length ``routing_segment`` and cache size ``routing_cache``. Their
per-layer values go to ``routing_layers.csv`` and each layer's expert load to
``plots/<model>/routing_load.csv``. The recorder runs inside the timed pass (a few small
copies per layer and step). Dense models get no routing keys.

With two models or more, every pair's paired bootstrap interval of the accuracy difference and
McNemar's test on the same prompts go to ``paired.json`` and under the table (``stages.metrics.all_pairs``).

Chat rows (``messages``) are prompted with their conversation rendered by each evaluated
model's own chat template (``stages.lm.chat.row_prompt``; the plain format without one), so
a teacher and its student each read the conversation as they were trained to.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.artifacts import Kind, Output, artifact_hash, fingerprint, read_manifest, write_json, write_manifest
from stages.config import DataConfig, EvaluateConfig, to_dict
from stages.devices import resolve_device
from stages.errors import DistilError
from stages.lm.chat import row_prompt
from stages.lm.generation import sample
from stages.lm.likeness import greedy_match, likeness
from stages.lm.models import is_moe, lm_identity, load_lm
from stages.lm.moe.metrics import routing_metrics
from stages.lm.moe.routing import routing_shape
from stages.lm.moe.scmoe import check_decode, decoding
from stages.lm.scoring import agree, majority, scorer
from stages.metrics import ece
from stages.report import write_paired, write_summary
from stages.tasks import prompts_in_splits
from stages.tasks.messages import MESSAGES
from stages.tasks.reasoning import extract_answer, normalise


def lm_metrics(path: Path, rows: list[dict], task, cfg, device, teacher_answers: dict[int, str] | None = None,
               routing: dict | None = None, greedy_out: list | None = None) -> dict[str, Any]:  # fmt: skip
    """The model's metrics; for an MoE model ``routing`` (when given) receives the per-layer
    routing table (``layers``) and load (``load`` [layers, experts]) for ``write_routing``;
    ``greedy_out`` (when given) receives each prompt's text, greedy completion and its score
    (None where the row cannot be scored)."""
    model, tokenizer = load_lm(path, device)
    moe = is_moe(model)
    decode = decoding(cfg, model, path)  # None = the model's own decoding
    score = scorer(task)
    prompts = [row_prompt(tokenizer, r) for r in rows]
    # warm-up: the first generate call of a process pays one-off costs the timing must not charge to one model
    sample(model, tokenizer, prompts[:1], samples=1, temperature=0.0, top_p=1.0, max_new_tokens=2, top_k=0, device=device,
           decode=decode)  # fmt: skip
    t0 = time.perf_counter()
    greedy, step, agent = [], min(cfg.batch_size, 64), {}
    if cfg.agent.tool != "none":
        greedy, answers, agent = _as_agent(model, tokenizer, prompts, cfg, device, step)
    else:
        for i in range(0, len(prompts), step):
            greedy += sample(model, tokenizer, prompts[i : i + step], samples=1, temperature=0.0, top_p=1.0,
                             max_new_tokens=cfg.max_new_tokens, top_k=0, device=device, decode=decode,
                             routing=moe, prompt_routing=moe)  # fmt: skip
        answers = [extract_answer(g["completion"])[0] for g in greedy]
    seconds = time.perf_counter() - t0
    per_row = [score(r, a) for r, a in zip(rows, answers, strict=True)]
    if greedy_out is not None:
        greedy_out.extend({"prompt": p, "completion": g["completion"], "token_ids": g["token_ids"], "score": s}
                          for p, g, s in zip(prompts, greedy, per_row, strict=True))  # fmt: skip
    scores = [s for s in per_row if s is not None]
    tokens = sum(len(g["token_ids"]) for g in greedy)
    metrics: dict[str, Any] = {
        "accuracy": float(np.mean(scores)) if scores else float("nan"),
        "unparsed_share": sum(a is None for a in answers) / len(rows),
        "params": sum(p.numel() for p in model.parameters()),
        "rows": len(rows),
        "rows_per_second": len(rows) / max(seconds, 1e-9),
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "ms_per_1k_rows": 1e6 * seconds / len(rows),
        "decode": cfg.decode,
        **agent,
    }
    if decode is not None:
        metrics.update(scmoe_beta=decode.beta, scmoe_alpha=decode.alpha, scmoe_weak_rank=decode.weak_rank)
    metrics.update(_per_task_accuracy(rows, answers, score))
    if teacher_answers is not None:
        pairs = [(a, teacher_answers.get(r["id"])) for r, a in zip(rows, answers, strict=True)]
        metrics["agreement_with_teacher"] = float(np.mean([agree(a, t) for a, t in pairs]))
    if moe and not agent:
        summary, layers, load = _routing(model, greedy, cfg)
        metrics.update(summary)
        if routing is not None:
            routing.update(layers=layers, load=load)
    if cfg.samples > 1:
        metrics.update(_sampled(model, tokenizer, rows, cfg, device, score, decode))
    return metrics


def _as_agent(model, tokenizer, prompts: list[str], cfg, device, batch: int) -> tuple[list[dict], list, dict]:
    """The model run as an agent (``agent.tool``; greedy, ``agent.samples`` code candidates per
    call): per prompt its trajectory as the completion, its final answer, and the agent's
    metrics: tool calls per prompt, the share of calls whose code failed, and the setting."""
    from stages.lm.agent.runner import Decoder, model_completer, solve

    decoder = Decoder(model_completer(model, tokenizer, device, batch), cfg.agent, 0.0, cfg.max_new_tokens)
    trajectories = solve(decoder, prompts, cfg.agent)
    greedy = [{"completion": t.text, "token_ids": tokenizer(t.text, add_special_tokens=False)["input_ids"]} for t in trajectories]
    calls = [s for t in trajectories for s in t.steps]
    metrics = {"tool_calls": sum(t.tool_calls for t in trajectories) / len(trajectories),
               "tool_error_share": sum(not s.ok for s in calls) / max(len(calls), 1),
               "agent_samples": cfg.agent.samples}  # fmt: skip
    return greedy, [t.answer for t in trajectories], metrics


def _compare_to_teacher(results: dict, greedy: dict[str, list], teacher: str, models: list[Path], device) -> None:
    """Every model's likeness to ``teacher`` (``stages.lm.likeness``) into its metrics."""
    name = Path(teacher).name
    reference = greedy[name]
    close = likeness(teacher, reference, {Path(p).name: str(p) for p in models}, device)
    for model, metrics in results.items():
        metrics.update(close.get(model, {}))
        metrics["greedy_match"] = greedy_match([g["completion"] for g in greedy[model]], [g["completion"] for g in reference])
        metrics["role"] = "teacher" if model == name else "student"


def _routing(model, greedy: list[dict], cfg):
    """Routing metrics over each greedy sequence: prompt positions then generated tokens."""
    shape = routing_shape(model)
    seqs, weights = [], []
    for g in greedy:
        ids = np.concatenate([np.asarray(g["prompt_expert_ids"], np.int64), np.asarray(g["expert_ids"], np.int64)])
        w = np.concatenate([g["prompt_expert_weights"], g["expert_weights"]])
        seqs.append(ids.reshape(-1, shape["layers"], shape["experts_per_token"]))
        weights.append(w.reshape(seqs[-1].shape))
    return routing_metrics(seqs, shape["experts"], weights=weights, segment=cfg.routing_segment, cache=cfg.routing_cache)


def write_routing(work: Path, routing: dict[str, dict]) -> None:
    """``routing_layers.csv`` (one row per MoE model and layer) and, per MoE model,
    ``plots/<model>/routing_load.csv`` (layer, expert, share of the layer's activations)."""
    import csv

    tables = {name: r for name, r in routing.items() if r}
    if not tables:
        return
    rows = [{"model": name, **row} for name, r in tables.items() for row in r["layers"]]
    with open(work / "routing_layers.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for name, r in tables.items():
        (work / "plots" / name).mkdir(parents=True, exist_ok=True)
        with open(work / "plots" / name / "routing_load.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["layer", "expert", "load"])
            w.writerows((layer, e, float(v)) for layer, shares in enumerate(r["load"]) for e, v in enumerate(shares))


def _per_task_accuracy(rows: list[dict], answers: list, score) -> dict[str, float]:
    """``accuracy_<task>`` for each task when the rows mix several (a task mixture); {} otherwise."""
    by_task: dict[str, list[float]] = {}
    for r, a in zip(rows, answers, strict=True):
        s = score(r, a)
        if s is not None:
            by_task.setdefault(str(r.get("task", "")), []).append(s)
    if len({str(r.get("task", "")) for r in rows}) < 2:
        return {}
    return {f"accuracy_{t}": float(np.mean(v)) for t, v in sorted(by_task.items())}


def _sampled(model, tokenizer, rows, cfg, device, score, decode=None) -> dict[str, float]:
    n = cfg.samples
    maj, any_right, share, maj_right = [], [], [], []
    per_batch = max(1, 64 // n)
    for i in range(0, len(rows), per_batch):
        chunk = rows[i : i + per_batch]
        gens = sample(model, tokenizer, [row_prompt(tokenizer, r) for r in chunk], samples=n, temperature=cfg.temperature, top_p=cfg.top_p,
                      max_new_tokens=cfg.max_new_tokens, top_k=0, device=device, decode=decode)  # fmt: skip
        for j, r in enumerate(chunk):
            answers = [extract_answer(g["completion"])[0] for g in gens[j * n : (j + 1) * n]]
            results = [score(r, a) for a in answers]
            if results[0] is None:
                continue
            top_answer, votes = majority(answers)
            right = score(r, top_answer) >= 1.0 if top_answer is not None else False
            maj.append(right)
            any_right.append(any(s >= 1.0 for s in results))
            share.append(votes / n)
            maj_right.append(right)
    if not maj:
        return {}
    conf = np.asarray(share)
    probs = np.stack([conf, 1 - conf], axis=1)  # the majority's vote share as its confidence
    labels = np.where(np.asarray(maj_right), 0, 1)
    return {f"maj@{n}": float(np.mean(maj)), f"pass@{n}": float(np.mean(any_right)), "vote_ece": ece(probs, labels, 15)}


def run(cfg: EvaluateConfig, models: list[Path], data, out: Path, *, data_cfg: DataConfig, cascades: list[Path] = (),
        device: str = "auto", console=None) -> Path:  # fmt: skip
    if cascades:
        raise DistilError("--cascade evaluates classifier cascades; an LM cascade writes its own metrics.json and summary.txt")
    check_decode(cfg.decode, cfg.scmoe_beta, cfg.scmoe_alpha, cfg.scmoe_weak_rank)
    dev_ = resolve_device(device)
    teacher_answers = None
    if Path(data).is_dir():  # LM teacher data: its prompts, gold answers and the teacher's majority answers
        rows, task, teacher_answers = _teacher_data_prompts(Path(data), cfg.split)
    else:
        rows, task = prompts_in_splits(data, data_cfg, [cfg.split])
    if not rows:
        raise DistilError(f"{data} has no prompts in split '{cfg.split}'; set evaluate.split")
    if cfg.samples < 1 or cfg.max_new_tokens < 1:
        raise DistilError("evaluate.samples and evaluate.max_new_tokens must be positive")
    if cfg.agent.tool != "none" and (cfg.samples > 1 or cfg.teacher or cfg.decode != "greedy"):
        raise DistilError("agent mode (agent.tool) scores each model's trajectories: set samples=1 (agent.samples samples "
                          "code candidates instead), teacher='' and decode=greedy")  # fmt: skip
    if cfg.routing_segment < 1 or cfg.routing_cache < 0:
        raise DistilError("evaluate.routing_segment must be >= 1 and routing_cache >= 0 (0 = 2 x experts per token)")
    params = {"evaluate": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": str(data), **{str(p): artifact_hash(Path(p)) for p in models}}
    output = Output(out, fingerprint("evaluate", params, inputs))
    teacher = str(cfg.teacher) if cfg.teacher else ""
    if teacher:
        inputs["teacher"] = lm_identity(teacher)["sha256"]
        models = [Path(teacher), *[p for p in models if str(p) != teacher]]  # the teacher first: its greedy answers are the reference
    with output as work:
        routing: dict[str, dict] = {Path(p).name: {} for p in models}  # MoE models: per-layer routing tables
        greedy: dict[str, list] = {Path(p).name: [] for p in models}
        results = {
            Path(p).name: lm_metrics(Path(p), rows, task, cfg, dev_, teacher_answers, routing[Path(p).name], greedy[Path(p).name])
            for p in models
        }  # fmt: skip
        if teacher:
            _compare_to_teacher(results, greedy, teacher, models, dev_)
        write_routing(work, routing)
        write_json(work / "metrics.json", results)
        write_summary(work, results, console)
        write_paired(work, {m: np.array([np.nan if g["score"] is None else g["score"] for g in gs]) for m, gs in greedy.items()},
                     console)  # fmt: skip
        write_manifest(
            work, kind=Kind.EVALUATION, params=params, inputs=inputs, extra={"task": {"name": str(data)}, "metrics": results}
        )
        return output.commit()


def _teacher_data_prompts(path: Path, split: str):
    """(one row per prompt of ``split``, the task, prompt id -> the teacher's majority answer,
    normalised) of LM teacher data."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from stages.tasks.mixture import task_from_manifest

    manifest = read_manifest(path)
    chat = [MESSAGES] if MESSAGES in pads.dataset(path, format="parquet").schema.names else []  # older tables have none
    table = pq.read_table(path, columns=["prompt_id", "split", "item", "prompt", "gold", "answer", "task", *chat])
    by_prompt: dict[int, dict] = {}
    answers: dict[int, list[str]] = {}
    for r in table.to_pylist():
        if r["split"] != split:
            continue
        by_prompt.setdefault(r["prompt_id"], {"id": r["prompt_id"], "split": r["split"], "item": r["item"], "prompt": r["prompt"],
                                              "answer": r["gold"], "task": r["task"], MESSAGES: r.get(MESSAGES)})  # fmt: skip
        if r["answer"] is not None:
            answers.setdefault(r["prompt_id"], []).append(r["answer"])
    task = task_from_manifest(manifest)
    teacher = {p: normalise(majority(a)[0]) for p, a in answers.items()}
    return list(by_prompt.values()), task, teacher
