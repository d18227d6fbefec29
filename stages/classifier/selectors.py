"""Selection strategies: each maps a batch of teacher data to (keep mask, weight, reason).

Strategies are pure functions of one Arrow record batch, so ``select`` streams a table
of any size batch by batch. ``SELECTORS`` is the explicit name -> function table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages.artifacts import list_column_to_numpy
from stages.config import SelectConfig
from stages.metrics import softmax


def confident(batch: pa.RecordBatch, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confident instance sampling (MDCS, section 3.3; FIRST): keep rows the teacher
    classifies correctly and, when ``threshold`` > 0, whose teacher max-probability
    reaches it (``require_correct=False`` keeps confident rows whatever their label).
    Weight = the teacher's max-probability, so near-threshold rows count less."""
    probs = softmax(list_column_to_numpy(batch.column("logits"), "teacher logits").astype(np.float64))
    labels = batch.column("label").to_numpy()
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    keep = np.ones(len(labels), dtype=bool)
    if cfg.require_correct:
        keep &= correct
    if cfg.threshold > 0:
        keep &= conf >= cfg.threshold
    reason = np.where(correct, "teacher-correct", "teacher-confident")
    if cfg.threshold > 0:
        reason = np.char.add(reason.astype(str), f";p>={cfg.threshold:g}")
    return keep, conf.astype(np.float32), reason.astype(str)


SELECTORS = {"confident": confident}
