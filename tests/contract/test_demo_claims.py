"""`.ci/demo_claims.py`, which `make demo-check` (run by CI) applies to the demo's LM metrics:
it fails on the order the broken demo showed and passes on teacher > distilled > gold."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "demo_claims.py"
spec = importlib.util.spec_from_file_location("demo_claims", SCRIPT)
demo_claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_claims)


def _write(tmp_path: Path, **acc: float) -> str:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({name: {"accuracy": a} for name, a in acc.items()}))
    return str(path)


def test_the_order_the_broken_demo_printed_fails(tmp_path, capsys):
    path = _write(tmp_path, lm_teacher=0.527, lm_sft_gold=0.870, lm_sft_teacher=0.405, lm_kd=0.453, lm_on_policy=0.473)
    assert demo_claims.main(path) == 1
    err = capsys.readouterr().err
    assert "lm_kd (0.453) does not beat the gold-only student (0.870)" in err
    assert "lm_on_policy (0.473) does not beat the gold-only student" in err


def test_a_student_above_its_teacher_fails(tmp_path, capsys):
    path = _write(tmp_path, lm_teacher=0.90, lm_sft_gold=0.80, lm_kd=0.95, lm_on_policy=0.85)
    assert demo_claims.main(path) == 1
    assert "lm_kd (0.950) is not below the teacher (0.900)" in capsys.readouterr().err


def test_teacher_above_distilled_above_gold_passes(tmp_path, capsys):
    path = _write(tmp_path, lm_teacher=0.977, lm_sft_gold=0.87, lm_kd=0.93, lm_on_policy=0.92)
    assert demo_claims.main(path) == 0
    assert capsys.readouterr().out.strip() == "demo claims hold: lm_teacher 0.977 > {lm_kd 0.930, lm_on_policy 0.920} > lm_sft_gold 0.870"
