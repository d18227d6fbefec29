"""The benchmarks' shared helpers: where models are kept, what a rerun reuses."""

from pathlib import Path

from bench.harness import cached, paired, paired_cell, seed_list, workdir


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


def test_seed_list_takes_an_explicit_list_before_a_count(monkeypatch):
    monkeypatch.delenv("BENCH_SEED_LIST", raising=False)
    monkeypatch.setenv("BENCH_SEEDS", "2")
    assert seed_list() == [0, 1]
    monkeypatch.setenv("BENCH_SEED_LIST", "2,5")
    assert seed_list() == [2, 5]


def test_a_paired_cell_shows_the_interval_only_with_several_seeds():
    assert paired_cell(paired([2.0], [1.0])) == "+1.000"
    # differences 1, 2, 1.5: mean 1.5, sd 0.5, t(0.975, 2 df) = 4.303 -> half-width 1.242
    assert paired_cell(paired([2.0, 3.0, 2.5], [1.0, 1.0, 1.0])) == "+1.500 [+0.258, +2.742]"


def test_cached_reruns_only_when_the_settings_change(tmp_path):
    calls = []

    def step():
        calls.append(1)
        (tmp_path / "out").mkdir()

    for settings in ("a", "a", "b", "b"):
        cached(tmp_path / "out", settings, step)
    assert len(calls) == 2 and (tmp_path / "out").is_dir()


def test_merging_per_seed_diffusion_runs_appends_seeds_and_pairs_the_claims(tmp_path):
    import json

    import pytest

    from bench.diffusion import merge_seed_results

    def rows(dmd, teacher):
        return {"dmd/steps_1": {"fd": [dmd]}, "teacher/steps_50": {"fd": [teacher]}}

    (tmp_path / "s0.json").write_text(json.dumps({"seeds": 1, "dataset": "digits-images", "table": rows(1.5, 1.0)}))
    for seed, (a, b) in ((1, (3.0, 1.0)), (2, (2.5, 1.5))):
        (tmp_path / f"s{seed}.json").write_text(json.dumps({"seeds": 1, "seed_list": [seed], "table": {"digits-images": rows(a, b)}}))
    got = merge_seed_results(["s0", "s1", "s2"], "all", tmp_path)
    assert got["seed_list"] == [0, 1, 2] and got["table"]["digits-images"]["dmd/steps_1"]["fd"] == [1.5, 3.0, 2.5]
    claim = got["claims"]["digits-images"]["second_wave"]["dmd at 1 step against the 50-step teacher (ratio; goal <= 1.5)"]
    assert claim["ratio"] == pytest.approx(7 / 3.5) and claim["paired"]["mean_diff"] == pytest.approx(7 / 6) and claim["paired"]["interval"]
    assert "| dmd | 1 | 2.333 ± 0.76 |" in (tmp_path / "all.md").read_text()
    with pytest.raises(SystemExit, match="share seed 1"):
        merge_seed_results(["s1", "s1"], "dup", tmp_path)


def test_a_rerun_of_one_method_replaces_its_rows_of_the_same_seeds_on_the_same_teacher(tmp_path):
    import json

    import pytest

    from bench.diffusion import merge_seed_results

    def run(name, seeds, dmd, teacher, methods=None):
        table = {"digits-images": {"dmd/steps_1": {"fd": dmd}, "teacher/steps_50": {"fd": teacher}}}
        pe = {"digits-images": {"dmd": [[4.0, v] for v in dmd]}}
        (tmp_path / f"{name}.json").write_text(json.dumps({"seeds": len(seeds), "seed_list": seeds, "table": table,
                                                           "paired_error_first_last": pe, "methods": methods}))  # fmt: skip

    run("a", [0, 1], [3.0, 4.0], [1.0, 2.0])
    run("b", [2], [5.0], [1.5])
    run("again", [1], [2.5], [2.0], methods=["dmd"])
    got = merge_seed_results(["a", "b"], "all", tmp_path, replace_from=["again"])
    assert got["table"]["digits-images"]["dmd/steps_1"]["fd"] == [3.0, 2.5, 5.0]  # seed 1's row replaced, in seed order
    assert got["table"]["digits-images"]["teacher/steps_50"]["fd"] == [1.0, 2.0, 1.5]
    assert got["paired_error_first_last"]["digits-images"]["dmd"] == [[4.0, 3.0], [4.0, 2.5], [4.0, 5.0]]
    assert got["replaced_from"] == ["again"]
    run("rounded", [1], [2.5], [2.000001], methods=["dmd"])  # the same teacher, summed in another order
    assert merge_seed_results(["a", "b"], "all", tmp_path, replace_from=["rounded"])["table"]["digits-images"]["dmd/steps_1"]["fd"][1] == 2.5
    run("other_teacher", [1], [2.5], [2.2], methods=["dmd"])
    with pytest.raises(SystemExit, match="not the same teacher"):
        merge_seed_results(["a", "b"], "all", tmp_path, replace_from=["other_teacher"])
    run("new_seed", [7], [2.5], [2.0], methods=["dmd"])
    with pytest.raises(SystemExit, match="seed 7 is in none"):
        merge_seed_results(["a", "b"], "all", tmp_path, replace_from=["new_seed"])


def test_a_second_wave_claim_reads_its_own_column_when_it_names_one():
    import pytest

    from bench.diffusion import second_wave_claims

    rows = {"dual-expert/steps_2": {"fd": [2.0, 2.2, 1.9], "paired_error": [0.7, 0.68, 0.71]},
            "multistep/steps_2": {"fd": [1.9, 2.0, 2.1], "paired_error": [0.8, 0.79, 0.83]}}  # fmt: skip
    got = second_wave_claims(rows, "fd")
    on_fd, on_pe = got["dual-expert against multistep at 2 steps"], got["dual-expert against multistep at 2 steps, paired error to the teacher"]
    assert on_fd["column"] == "fd" and on_fd["mean_a"] == pytest.approx(6.1 / 3) and not on_fd["a_better"]
    assert on_pe["column"] == "paired_error" and on_pe["a_better"] and on_pe["paired"]["mean_diff"] == pytest.approx(-0.11)
    assert on_pe["paired"]["interval"][1] < 0  # better on every seed by a steady margin: the interval excludes zero
    assert "dmd at 1 step against the 50-step teacher (ratio; goal <= 1.5)" not in got  # rows not measured: no claim


def test_a_claim_on_a_diversity_column_counts_higher_as_better_and_the_table_shows_the_column(tmp_path):
    import json

    from bench.diffusion import merge_seed_results

    table = {"digits-images": {"phased-dmd/steps_2": {"fd": [2.3, 2.2], "fd_at_floor_n": [3.1, 3.0], "recall": [0.6, 0.62]},
                               "dmd/steps_1": {"fd": [2.0, 2.1], "fd_at_floor_n": [2.9, 3.2], "recall": [0.5, 0.55]}}}  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps({"seeds": 2, "seed_list": [0, 1], "table": table}))
    got = merge_seed_results(["r"], "out", tmp_path)["claims"]["digits-images"]["second_wave"]
    on_recall = got["phased-dmd at 2 steps against dmd at 1, recall (diversity; higher is better)"]
    assert on_recall["a_better"] and on_recall["paired"]["mean_diff"] > 0
    assert not got["phased-dmd at 2 steps against dmd at 1"]["a_better"]  # worse on fd, the lower-is-better column
    md = (tmp_path / "out.md").read_text()
    assert "| model | steps | fd | fd at the floor's n | recall | paired error" in md
    assert "| dmd | 1 | 2.05 ± 0.071 | 3.05 ± 0.21 | 0.525 ± 0.035 |" in md and "recall: higher is better)" in md
    assert "precision" not in md.split("| claim |")[0]  # a column no row has is not shown


def test_merged_seeds_appends_each_runs_rows_and_the_multi_student_claims_pair_them(tmp_path):
    import json

    import pytest

    from bench.harness import merged_seeds
    from bench.multi_student import METRICS, report

    def run(seed, multi_fd, one_fd):
        rows = {f"{label}/{k}": {m: [one_fd if label != "multi-student" else multi_fd] for m in METRICS}
                for label in ("one student", "one student, 2x steps", "multi-student") for k in (1, 2)}  # fmt: skip
        (tmp_path / f"ms{seed}.json").write_text(json.dumps({"seeds": [seed], "per_seed": rows}))

    for seed, (multi, one) in enumerate(((1.0, 2.0), (0.9, 2.0), (1.1, 2.0))):
        run(seed, multi, one)
    seeds, rows = merged_seeds(["ms0", "ms1", "ms2"], tmp_path)
    assert seeds == [0, 1, 2] and rows["multi-student/1"]["fd"] == [1.0, 0.9, 1.1]
    out, lines = report(seeds, rows)
    fd = out["claims"]["1 step"]["fd"]
    assert fd["mean_diff"] == pytest.approx(-1.0) and fd["excludes_zero"] and fd["seeds"] == 3  # differences -1, -1.1, -0.9
    assert any(line.startswith("| multi-student | 1 | 1.00 |") for line in lines)
    with pytest.raises(SystemExit, match="share seeds"):
        merged_seeds(["ms0", "ms0"], tmp_path)
    with pytest.raises(SystemExit, match="run that seed first"):
        merged_seeds(["ms9"], tmp_path)
