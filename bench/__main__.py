"""``python -m bench [NAME ...]``: run the listed benchmarks (default: all of BENCHMARKS).

Each benchmark is a module ``bench.<name>`` with a ``main() -> int`` that prints exactly one
JSON line to stdout. The exit status is the largest one returned.
"""

from __future__ import annotations

import importlib
import sys

from bench.harness import emit

BENCHMARKS = [
    "losses_vs_reference",
    "digits_students",
    "classifier_methods",
    "classifier_features",
    "student_search",
    "dataset_distill",
    "meta_dmoe",
    "control_transfer",
    "multi_gate",
    "lm_distillation",
    "lm_students",
    "lm_reward",
    "lm_curio",
    "lm_agent",
    "lm_qcrd",
    "diffusion_cfg",
    "multi_student",
    "lm_cascade",
    "lm_cascade_defer",
    "lm_moe",
    "diffusion",
    "teachers",
    "cross_tokenizer",
    "topk_storage",
    "teacher_hacking",
]


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    names = names or BENCHMARKS
    rc = 0
    for name in names:
        if name not in BENCHMARKS:
            emit(name, error=f"unknown benchmark; choose from {BENCHMARKS}")
            rc = max(rc, 2)
            continue
        rc = max(rc, importlib.import_module(f"bench.{name}").main() or 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
