"""`stages.modality`: the one answer to "which modality is this?" for every kind of input,
and the routers' refusals of the pairs they do not support, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import cascade as cascade_stage
from stages import distill as distill_stage
from stages import evaluate as evaluate_stage
from stages import select as select_stage
from stages.artifacts import KIND_MODALITY, MANIFEST, Kind
from stages.config import CascadeConfig, DataConfig, DistillConfig, EvaluateConfig, SelectConfig
from stages.errors import DistilError
from stages.modality import CLASSIFIER, DIFFUSION, LM, MODALITIES, NAMES, of_data, of_method, of_model, refuse


def _one_line(result):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output


def _nothing_at(out):
    assert not out.exists(), f"{out} was written"
    assert not out.with_name(out.name + ".partial").exists(), f"{out}.partial was left behind"


def _diffusers_folder(path):
    """What `of_model` recognises as a generator: a folder with model_index.json."""
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DistilGeneratorPipeline"}))
    (path / "scheduler").mkdir()
    return path


# ---- of_data ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, modality",
    [
        ("digits", CLASSIFIER),
        ("chain_sum", LM),
        ("basic_arithmetic", LM),
        ("chain_sum+basic_arithmetic", LM),
        ("moons", DIFFUSION),
        ("eight-gaussians", DIFFUSION),
        ("digits-images", DIFFUSION),
        ("hf:openai/gsm8k", LM),
    ],
)
def test_of_data_builtin_names(name, modality, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name next to us
    assert of_data(name) == modality


def test_a_file_named_like_a_generator_dataset_is_not_the_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"x": [1.0], "label": [0]}), tmp_path / "moons")
    assert of_data("moons") == CLASSIFIER


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".JSONL"])
def test_of_data_json_prompt_files_are_lm(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert of_data(path) == LM
    assert of_data(str(path)) == LM


def test_of_data_parquet_by_its_columns(tmp_path):
    with_prompt, without = tmp_path / "p.parquet", tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": ["1+1="], "answer": ["2"]}), with_prompt)
    pq.write_table(pa.table({"f0": [0.5], "f1": [1.5], "label": [1]}), without)
    assert of_data(with_prompt) == LM
    assert of_data(without) == CLASSIFIER


def test_of_data_parquet_and_csv_follow_the_configured_prompt_column(tmp_path):
    parquet, csv = tmp_path / "q.parquet", tmp_path / "q.csv"
    pq.write_table(pa.table({"question": ["1+1="], "answer": ["2"]}), parquet)
    csv.write_text("question,answer\n1+1=,2\n")
    for path in (parquet, csv):
        assert of_data(path) == CLASSIFIER  # default prompt column is "prompt"
        assert of_data(path, DataConfig(prompt_column="question")) == LM


def test_of_data_unreadable_parquet_is_classifier_not_a_crash(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert of_data(bad) == CLASSIFIER


def test_of_data_csv_by_its_header(tmp_path):
    with_prompt, without = tmp_path / "p.csv", tmp_path / "c.csv"
    with_prompt.write_text("id,prompt,answer\n0,1+1=,2\n")
    without.write_text("f0,f1,label\n0.5,1.5,1\n")
    assert of_data(with_prompt) == LM
    assert of_data(without) == CLASSIFIER


def test_of_data_csv_header_column_must_match_exactly(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("prompts,label\nx,1\n")
    assert of_data(path) == CLASSIFIER


def test_every_kind_maps_to_a_known_modality():
    kinds = {v for k, v in vars(Kind).items() if not k.startswith("_")}
    assert kinds == set(KIND_MODALITY), "a manifest kind without a modality (or a stale entry)"
    assert set(KIND_MODALITY.values()) <= set(MODALITIES)


@pytest.mark.parametrize("kind, modality", sorted(KIND_MODALITY.items()))
def test_of_data_distil_table_by_its_manifest_kind(tmp_path, kind, modality):
    table = tmp_path / "table"
    table.mkdir()
    (table / MANIFEST).write_text(json.dumps({"kind": kind, "rows": 0}))
    # a prompt-looking file inside must not matter: the manifest decides
    pq.write_table(pa.table({"prompt": ["x"]}), table / "part-00000.parquet")
    assert of_data(table) == modality


def test_of_data_table_with_unknown_or_no_kind_is_classifier(tmp_path):
    for i, manifest in enumerate([{"kind": "something-new"}, {"rows": 3}]):
        table = tmp_path / f"t{i}"
        table.mkdir()
        (table / MANIFEST).write_text(json.dumps(manifest))
        assert of_data(table) == CLASSIFIER


def test_of_data_a_table_named_like_a_builtin_is_read_by_its_manifest(tmp_path):
    # a distil directory named like a built-in is read by its manifest
    table = tmp_path / "moons"
    table.mkdir()
    (table / MANIFEST).write_text(json.dumps({"kind": Kind.LM_TEACHER_DATA}))
    assert of_data(table) == LM


# ---- of_model / of_method --------------------------------------------------------------


def _model_dir(root: Path, name: str, config: str | None) -> Path:
    """A folder ``name`` holding ``config`` as its config.json (none when None)."""
    d = root / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config)
    return d


@pytest.mark.parametrize(
    "name, config",
    [
        ("clf", json.dumps({"arch": "mlp", "num_classes": 10})),
        ("empty", None),
        ("broken", "{not json"),
        ("listed", json.dumps(["model_type"])),
    ],
)
def test_of_model_classifier_dir(tmp_path, name, config):
    assert of_model(_model_dir(tmp_path, name, config)) == CLASSIFIER


def test_of_model_lm_dir(tmp_path):
    d = _model_dir(tmp_path, "lm", json.dumps({"model_type": "llama", "hidden_size": 16}))
    assert of_model(d) == LM
    assert of_model(str(d)) == LM


def test_of_model_diffusers_folder_wins_over_config(tmp_path):
    d = _diffusers_folder(tmp_path / "gen")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert of_model(d) == DIFFUSION


def test_of_model_real_classifier(tiny_run):
    assert of_model(tiny_run["teacher"]) == CLASSIFIER


def test_of_model_not_a_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert of_model(f) is None
    assert of_model(tmp_path / "missing") is None
    assert of_model("smollm2-135m") is None


def test_of_method():
    assert set(of_method("kd")) == {CLASSIFIER, LM}
    assert of_method("ce") == (CLASSIFIER,)
    assert of_method("sft") == (LM,)
    assert of_method("denoise") == (DIFFUSION,)
    assert of_method("consistency-distill") == (DIFFUSION,)
    assert of_method("no-such-method") == ()


def test_refuse_names_the_command_and_modality():
    err = refuse("select", DIFFUSION, "why not")
    assert isinstance(err, DistilError)
    assert str(err) == "`distil select` does not support diffusion inputs: why not"
    assert NAMES[LM] in str(refuse("cascade", LM))
    assert "\n" not in str(refuse("cascade", LM))


# ---- the routers refuse, directly ------------------------------------------------------


def test_select_router_refuses_generator_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistilError, match="does not support diffusion"):
        select_stage.run(SelectConfig(), "moons", tmp_path / "out", progress=False)
    _nothing_at(tmp_path / "out")


def test_distill_router_refuses_a_generator_method_on_other_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for data in ("digits", "chain_sum"):
        with pytest.raises(DistilError, match="trains a generator"):
            distill_stage.run(DistillConfig(method="denoise"), data, tmp_path / "out", data_cfg=DataConfig())
    _nothing_at(tmp_path / "out")


def test_cascade_router_refuses_a_generator_teacher_too(tmp_path, tiny_run):
    gen = _diffusers_folder(tmp_path / "gen")
    with pytest.raises(DistilError, match="does not support diffusion"):
        cascade_stage.run(CascadeConfig(), tiny_run["teacher"], gen, tiny_run["tdata"], tmp_path / "out", data_cfg=DataConfig())
    _nothing_at(tmp_path / "out")


def test_evaluate_router_needs_something(tmp_path):
    with pytest.raises(DistilError, match="nothing to evaluate"):
        evaluate_stage.run(EvaluateConfig(), [], "digits", tmp_path / "out", data_cfg=DataConfig())


# ---- the routers refuse, through the CLI -----------------------------------------------


def test_cli_select_on_generator_data(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sel"
    result = cli.fails("select", "moons", "--out", out, "-q", match="`distil select` does not support diffusion")
    _one_line(result)
    _nothing_at(out)


@pytest.mark.parametrize("data", ["digits", "chain_sum"])
def test_cli_distill_diffusion_method_on_non_generator_data(cli, tmp_path, data):
    out = tmp_path / "student"
    _one_line(cli.fails("distill", "--method", "consistency-distill", "--data", data, "--out", out, "-q",
              match="method 'consistency-distill' trains a generator"))  # fmt: skip
    _nothing_at(out)


def test_cli_cascade_given_a_diffusion_model(cli, tmp_path, tiny_run):
    gen = _diffusers_folder(tmp_path / "gen")
    out = tmp_path / "casc"
    _one_line(cli.fails("cascade", "--student", gen, "--teacher", gen, "--data", "moons", "--out", out, "-q",
              match="`distil cascade` does not support diffusion"))  # fmt: skip
    _nothing_at(out)
    # a generator student on classifier data is refused just the same
    cli.fails("cascade", "--student", gen, "--teacher", tiny_run["teacher"], "--data", tiny_run["tdata"], "--out", out,
              "-q", match="does not support diffusion")  # fmt: skip
    _nothing_at(out)


def test_cli_evaluate_mixing_a_generator_with_a_classifier(cli, tmp_path, tiny_run):
    gen = _diffusers_folder(tmp_path / "gen")
    out = tmp_path / "ev"
    _one_line(cli.fails("evaluate", "--model", gen, "--model", tiny_run["teacher"], "--data", "moons", "--out", out, "-q",
              match="evaluate generators (diffusers folders) on their own"))  # fmt: skip
    _nothing_at(out)
    cli.fails("evaluate", "--model", gen, "--cascade", tiny_run["root"] / "nowhere", "--data", "moons", "--out", out,
              "-q", match="on their own")  # fmt: skip
    _nothing_at(out)
