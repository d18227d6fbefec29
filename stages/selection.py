"""What every ``distil select`` shares, whatever the modality: a strategy's verdicts apply
to the rows of the selected splits only; every other row passes through with weight 1
(so dev and test stay unbiased), and the kept share is counted per split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class Tally:
    """Applies verdicts batch by batch and counts (kept, rows) per split for the manifest."""

    def __init__(self, splits: list[str]):
        self.splits = list(splits)
        self.counts: dict[str, list[int]] = {s: [0, 0] for s in self.splits}

    def apply(self, table: pa.Table, keep: np.ndarray, weight: np.ndarray, reason: np.ndarray) -> pa.Table:
        """The kept rows of ``table`` with their ``weight`` and ``reason`` columns."""
        splits = np.asarray(table.column("split").to_pylist(), dtype=object).astype(str)
        selected = np.isin(splits, self.splits)
        keep = np.where(selected, keep, True)
        weight = np.where(selected, weight, 1.0).astype(np.float32)
        reason = np.where(selected, reason, "passthrough")
        for s in np.unique(splits):
            k = self.counts.setdefault(str(s), [0, 0])
            k[0] += int(keep[splits == s].sum())
            k[1] += int((splits == s).sum())
        chosen = table.filter(pa.array(keep))
        return chosen.append_column("weight", pa.array(weight[keep])).append_column("reason", pa.array(reason[keep]))

    @property
    def kept_any(self) -> bool:
        """Whether any row of a selected split was kept."""
        return any(self.counts[s][0] for s in self.splits)

    def stats(self) -> dict[str, dict[str, float]]:
        return {s: {"kept": k, "rows": n, "share": k / max(n, 1)} for s, (k, n) in self.counts.items()}
