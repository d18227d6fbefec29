"""A calibrated LM cascade as a ``Teacher``-protocol engine, so ``distil serve --policy-file``
answers requests with it (``stages.lm.serve.app`` serves any engine).

The policy file is the ``policy.json`` an offline ``distil cascade`` wrote; the student and
teacher must be the models it was calibrated for (content hashes checked). Each request's
prompt goes through the offline code path (``stages.lm.cascade.student_step``, a
``Sampler`` seeded per query): the student samples, the policy keeps or defers, and a
deferred query gets the teacher's greedy answer. With ``cascade.seed_per_query: true`` in
the offline run, a served query is decided exactly as that run decided it. The request's
own sampling settings are the policy's, not the client's; every choice reports the route,
the agreement, the samples used and the cost (``distil`` extension field).
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.config import CascadeConfig, TeacherConfig, from_dict
from stages.errors import DistilError
from stages.lm.teachers.base import Completion, Sampling, Scored

SERVABLE = ("student", "teacher", "sc-cascade", "adaptive")
"""Policies a server can run from a policy file alone (the ICD ones also need the bank)."""


def read_policy(path: Path) -> dict:
    """A policy file of ``distil cascade`` with the settings a server needs; one clear line otherwise."""
    try:
        policy = json.loads(Path(path).read_text())
        policy["policy"], policy["student"]["sha256"], policy["teacher"]["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise DistilError(f"{path} is not a cascade policy file; write one with `distil cascade ... --out DIR` (DIR/policy.json)") from None
    if "sampling" not in policy:
        raise DistilError(f"{path} predates served cascades (no sampling settings); rerun `distil cascade` to write a new one")
    if policy["policy"] not in SERVABLE:
        raise DistilError(
            f"policy '{policy['policy']}' needs the demonstration bank or voters; serve one of {', '.join(SERVABLE)}"
        )
    return policy


class CascadeEngine:
    """The student and teacher of a policy file behind ``generate`` (one answer per prompt)."""

    def __init__(self, policy_file: Path, student, teacher, device, teacher_cfg: TeacherConfig | None = None):
        from stages.lm.cascade import _load

        self.policy = read_policy(policy_file)
        sampling = self.policy["sampling"]
        cfg = from_dict(CascadeConfig, {"policy": self.policy["policy"], "samples": self.policy["samples"],
                                        "temperature": sampling["temperature"], "top_p": sampling["top_p"],
                                        "max_new_tokens": sampling["max_new_tokens"], "seed": sampling["seed"],
                                        "costs": self.policy.get("costs", {})}, "policy")  # fmt: skip
        if teacher_cfg is not None:
            cfg.teacher = teacher_cfg
        self.cfg = cfg
        self.lms, ids, self.unit = _load(cfg, {"student": student, "teacher": teacher}, device)
        for role in ("student", "teacher"):
            if ids[role].get("sha256") != self.policy[role]["sha256"]:
                raise DistilError(f"{policy_file} was calibrated for {role} {self.policy[role].get('path')}, not {ids[role].get('path') or ids[role].get('url')}; "
                                  "serve the models it was calibrated for")  # fmt: skip
        self.tokenizer = self.lms["student"].tokenizer
        self.context = self.lms["student"].context
        self.identity = {"backend": "cascade", "policy": self.policy["policy"], "threshold": self.policy.get("threshold"),
                         "student": ids["student"], "teacher": ids["teacher"]}  # fmt: skip
        self.device = device

    def _sampler(self):
        from stages.lm.cascade_cost import Sampler

        s = self.policy["sampling"]
        return Sampler(seed=s["seed"], stream=1, batch_size=self.cfg.batch_size, top_p=s["top_p"],
                       max_new_tokens=s["max_new_tokens"], device=self.device, per_query=True)  # fmt: skip

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Completion]:
        from stages.lm.cascade import student_step
        from stages.lm.scoring import majority_index

        if n != 1:
            raise DistilError("a cascade gives one answer per prompt; ask with n=1")
        policy, s = self.policy["policy"], self.policy["sampling"]
        threshold = self.policy["threshold"] if self.policy["threshold"] is not None else 0.0
        sampler, student, teacher = self._sampler(), self.lms["student"], self.lms["teacher"]
        steps = student_step(policy, self.policy["samples"], threshold, s["temperature"], sampler, student, [], prompts,
                             s["stop_confidence"], s.get("sample_budget", 0.0))  # fmt: skip
        out = []
        for prompt, o in zip(prompts, steps, strict=True):
            cost = float(student.pricer(o["s_prompt"], o["s_completion"]))
            info = {"route": "student", "agreement": o["agreement"], "samples_used": o["used"], "student_answer": o["student_answer"]}
            if o["keep"] and o["texts"]:
                text = o["texts"][majority_index(o["answers"]) or 0]
                usage = (o["s_prompt"], o["s_completion"])
            else:
                ref = sampler.draw(teacher, [prompt], 1, 0.0)
                text, usage = ref.texts[0][0], (ref.prompt_tokens[0], ref.completion_tokens[0][0])
                cost += float(teacher.pricer(*usage))
                info["route"] = "teacher"
            info.update(cost=cost, cost_unit=self.unit)
            out.append(Completion(text=text, token_ids=None, seq_logprob=None, finish_reason="stop", prompt_tokens=int(usage[0]),
                                  completion_tokens=int(usage[1]), extra={"distil": info}))  # fmt: skip
        return out

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], top_k: int) -> list[Scored]:
        raise DistilError("a cascade answers; it does not score given text: serve the teacher or the student for log-probs")

    def close(self) -> None:
        for lm in self.lms.values():
            lm.teacher.close()
