"""The benchmarks' shared helpers: where models are kept, what a rerun reuses."""

from pathlib import Path

from bench.harness import cached, workdir


def test_workdir_is_a_removed_temp_dir_unless_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_WORKDIR", raising=False)
    with workdir() as tmp:
        (tmp / "x").write_text("1")
        seen = Path(tmp)
    assert not seen.exists()
    kept = tmp_path / "kept"
    monkeypatch.setenv("BENCH_WORKDIR", str(kept))
    with workdir() as tmp:
        (tmp / "x").write_text("1")
    assert (kept / "x").read_text() == "1"


def test_cached_reruns_only_when_the_settings_change(tmp_path):
    calls = []

    def step():
        calls.append(1)
        (tmp_path / "out").mkdir()

    for settings in ("a", "a", "b", "b"):
        cached(tmp_path / "out", settings, step)
    assert len(calls) == 2 and (tmp_path / "out").is_dir()
