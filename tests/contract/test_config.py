"""`stages.config` on its own: building configs from mappings, type coercion, --set
parsing, reading params files, which keys a run was given, and `check_modality`'s refusal
of a setting that only another modality reads; then the same refusal through the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import Cli, write_params
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.config import (
    CLASSIFIER,
    DIFFUSION,
    EVERY,
    LM,
    MODALITY_NAMES,
    PER_MODALITY,
    CascadeConfig,
    DataConfig,
    DiffusionConfig,
    DistillConfig,
    EvaluateConfig,
    GenerateTeacherDataConfig,
    LMConfig,
    ModelConfig,
    SelectConfig,
    _coerce,
    check_modality,
    from_dict,
    load_section,
    parse_overrides,
    read_params,
    to_dict,
)
from stages.errors import DistilError

STAGES = (GenerateTeacherDataConfig, SelectConfig, DistillConfig, CascadeConfig, EvaluateConfig)


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _plain(value):
    """A default as it would come out of YAML: dataclasses as mappings, lists copied."""
    if dataclasses.is_dataclass(value):
        return {}
    return json.loads(json.dumps(value))


# ---- from_dict ---------------------------------------------------------------------------


def test_from_dict_unknown_keys_name_the_valid_ones():
    with pytest.raises(DistilError) as exc:
        from_dict(SelectConfig, {"bye": "confident", "treshold": 0.5}, "select")
    msg = str(exc.value)
    assert "unknown key(s) bye, treshold in params section 'select'" in msg
    names = sorted(f.name for f in dataclasses.fields(SelectConfig))
    assert msg.endswith("valid keys: " + ", ".join(names))


def test_from_dict_unknown_nested_key_names_the_nested_section():
    with pytest.raises(DistilError, match=r"unknown key\(s\) widht in params section 'distill.model'") as exc:
        from_dict(DistillConfig, {"model": {"widht": 3}}, "distill")
    assert "valid keys: arch, depth, dropout, experts, width" in str(exc.value)


def test_from_dict_nested_must_be_a_mapping():
    with pytest.raises(DistilError, match=r"params 'distill.lm' must be a mapping, got 3"):
        from_dict(DistillConfig, {"lm": 3}, "distill")


def test_from_dict_builds_nested_and_keeps_other_defaults():
    cfg = from_dict(DistillConfig, {"model": {"width": 7}, "epochs": 2, "lm": {"hidden": 16}}, "distill")
    assert cfg.model == ModelConfig(width=7)
    assert cfg.lm == LMConfig(hidden=16)
    assert cfg.epochs == 2 and cfg.diffusion == DiffusionConfig()
    assert from_dict(DistillConfig, None, "distill") == DistillConfig()


def test_from_dict_round_trips_to_dict():
    cfg = DistillConfig(method="jsd", beta=0.2, model=ModelConfig(arch="cnn"), expert_lambdas=[0.5, 1.0])
    assert from_dict(DistillConfig, to_dict(cfg), "distill") == cfg


# ---- _coerce -----------------------------------------------------------------------------


def test_coerce_float_from_int():
    out = _coerce(3, float, "x")
    assert out == 3.0 and type(out) is float
    assert from_dict(DistillConfig, {"lr": 1}, "distill").lr == 1.0


def test_coerce_refuses_bools_as_numbers():
    with pytest.raises(DistilError, match=r"params 'x' must be float, got True"):
        _coerce(True, float, "x")
    with pytest.raises(DistilError, match=r"params 'x' must be int, got False"):
        _coerce(False, int, "x")


def test_coerce_refuses_floats_and_strings_as_ints():
    with pytest.raises(DistilError, match="must be int, got 2.5"):
        _coerce(2.5, int, "x")
    with pytest.raises(DistilError, match="must be int, got '3'"):
        _coerce("3", int, "x")
    with pytest.raises(DistilError, match="must be str, got 3"):
        _coerce(3, str, "x")


def test_coerce_yaml_bools_become_the_words_for_text_settings():
    assert _coerce(True, str, "x") == "on"
    assert _coerce(False, str, "x") == "off"
    # through YAML as a user writes it: `routing: on`
    loaded = yaml.safe_load("routing: on\ndecode: greedy\n")
    cfg = from_dict(GenerateTeacherDataConfig, loaded, "generate_teacher_data")
    assert cfg.routing == "on" and cfg.decode == "greedy"
    assert from_dict(GenerateTeacherDataConfig, yaml.safe_load("routing: off"), "g").routing == "off"


def test_coerce_bool_only_from_bool():
    assert _coerce(True, bool, "x") is True
    with pytest.raises(DistilError, match="must be bool"):
        _coerce(1, bool, "x")
    with pytest.raises(DistilError, match="must be bool"):
        _coerce("yes", bool, "x")


def test_coerce_comma_lists_and_yaml_lists():
    assert _coerce("train,dev", list[str], "x") == ["train", "dev"]
    assert _coerce("train,,test,", list[str], "x") == ["train", "test"]
    assert _coerce("", list[str], "x") == []
    assert _coerce(["a", "b"], list[str], "x") == ["a", "b"]
    floats = _coerce([1, 2.5], list[float], "x")
    assert floats == [1.0, 2.5] and all(type(v) is float for v in floats)
    with pytest.raises(DistilError, match=r"params 'x' must be int, got 'a'"):
        _coerce([1, "a"], list[int], "x")


def test_coerce_comma_list_items_take_the_item_type():
    assert _coerce("1,2,4", list[int], "x") == [1, 2, 4]


def test_coerce_dicts_and_wrong_containers():
    assert _coerce({"a": 1}, dict, "x") == {"a": 1}
    with pytest.raises(DistilError, match="must be dict"):
        _coerce([1], dict, "x")
    with pytest.raises(DistilError, match="must be list"):
        _coerce(3, list[int], "x")


# ---- parse_overrides ---------------------------------------------------------------------


def test_parse_overrides_nests_dotted_keys_and_parses_yaml_scalars():
    out = parse_overrides(["epochs=3", "model.width=16", "model.arch=cnn", "lm.init=models/x", "reverse_skew=true",
                           "lr=0.5", "splits=[train, dev]", "method=", "note=a=b"])  # fmt: skip
    assert out == {
        "epochs": 3,
        "model": {"width": 16, "arch": "cnn"},
        "lm": {"init": "models/x"},
        "reverse_skew": True,
        "lr": 0.5,
        "splits": ["train", "dev"],
        "method": "",
        "note": "a=b",
    }
    assert parse_overrides([]) == {}
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_parse_overrides_later_wins():
    assert parse_overrides(["epochs=3", "epochs=4"]) == {"epochs": 4}


@pytest.mark.parametrize("pair", ["epochs", "=3", ""])
def test_parse_overrides_errors(pair):
    with pytest.raises(DistilError, match="--set expects key=value, got"):
        parse_overrides([pair])


def test_parse_overrides_scalar_then_dotted_key_is_a_distil_error():
    with pytest.raises(DistilError):
        parse_overrides(["model=3", "model.width=4"])


def test_set_scientific_notation_is_a_float():
    cfg = load_section(DistillConfig, {}, "distill", parse_overrides(["lr=1e-3"]))
    assert cfg.lr == 0.001


# ---- read_params -------------------------------------------------------------------------


def test_read_params_none_and_the_default_name_mean_defaults(tmp_path, monkeypatch):
    assert read_params(None) == {}
    monkeypatch.chdir(tmp_path)
    assert read_params(Path("params.yaml")) == {}


def test_read_params_missing_file(tmp_path):
    with pytest.raises(DistilError, match=r"params file .*nope\.yaml not found"):
        read_params(tmp_path / "nope.yaml")
    # an explicit path to a missing params.yaml elsewhere is an error too
    with pytest.raises(DistilError, match="not found"):
        read_params(tmp_path / "params.yaml")


def test_read_params_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: {epochs: 3\nselect: [\n")
    with pytest.raises(DistilError, match="is not valid YAML") as exc:
        read_params(bad)
    assert "\n" not in str(exc.value)


def test_read_params_must_be_a_mapping(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(DistilError, match="must be a mapping of sections"):
        read_params(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_params(empty) == {}
    good = write_params(tmp_path)
    assert read_params(good)["distill"]["method"] == "kd"


# ---- load_section ------------------------------------------------------------------------


def test_load_section_records_section_and_override_keys():
    params = {"distill": {"epochs": 3, "model": {"width": 8}}}
    cfg = load_section(DistillConfig, params, "distill", {"lr": 0.1, "model": {"depth": 2}})
    assert cfg._given == frozenset({"epochs", "model", "lr"})
    assert cfg.epochs == 3 and cfg.lr == 0.1 and cfg.model == ModelConfig(width=8, depth=2)


def test_load_section_shared_does_not_count_the_section():
    params = {"distill": {"epochs": 3, "lmbda": 0.2}}
    cfg = load_section(DistillConfig, params, "distill", {"seed": 4}, shared=True)
    assert cfg._given == frozenset({"seed"})
    assert cfg.epochs == 3 and cfg.lmbda == 0.2 and cfg.seed == 4
    check_modality(cfg, CLASSIFIER)  # lmbda came from the shared section: not refused


def test_load_section_missing_section_is_defaults_and_bad_section_raises():
    cfg = load_section(SelectConfig, {}, "select")
    assert cfg == SelectConfig() and cfg._given == frozenset()
    with pytest.raises(DistilError, match="params section 'select' must be a mapping"):
        load_section(SelectConfig, {"select": [1, 2]}, "select")
    with pytest.raises(DistilError, match=r"unknown key\(s\) nope"):
        load_section(SelectConfig, {}, "select", {"nope": 1})


def test_load_section_does_not_change_equality_or_to_dict():
    cfg = load_section(DistillConfig, {"distill": {"epochs": 3}}, "distill")
    assert cfg == DistillConfig(epochs=3)
    assert "_given" not in to_dict(cfg)


# ---- check_modality ----------------------------------------------------------------------


def test_lm_only_key_refused_for_a_classifier_run():
    cfg = load_section(DistillConfig, {}, "distill", {"lmbda": 0.3})
    with pytest.raises(DistilError) as exc:
        check_modality(cfg, CLASSIFIER)
    msg = str(exc.value)
    assert msg == (
        "setting 'lmbda' is for language-model students, not classifier students; drop it from the params section and --set"
    )
    check_modality(cfg, LM)


def test_classifier_only_key_refused_for_an_lm_run():
    cfg = load_section(DistillConfig, {"student": {"augment": "weak"}}, "student")
    with pytest.raises(DistilError, match="setting 'augment' is for classifier students, not language-model students"):
        check_modality(cfg, LM)
    with pytest.raises(DistilError, match="not diffusion students"):
        check_modality(cfg, DIFFUSION)
    check_modality(cfg, CLASSIFIER)


def test_keys_of_two_modalities_name_both():
    cfg = load_section(DistillConfig, {}, "distill", {"temperature": 3.0})
    with pytest.raises(DistilError, match="'temperature' is for classifier and language-model students, not diffusion"):
        check_modality(cfg, DIFFUSION)


def test_each_stage_names_its_runs():
    cases = [(SelectConfig, "min_agreement", 0.5, "selections"), (CascadeConfig, "samples", 3, "cascades"),
             (EvaluateConfig, "decode", "scmoe", "evaluations"), (GenerateTeacherDataConfig, "samples", 2, "teachers")]  # fmt: skip
    for cls, key, value, runs in cases:
        cfg = load_section(cls, {}, "s", {key: value})
        with pytest.raises(DistilError, match=f"language-model {runs}, not classifier {runs}"):
            check_modality(cfg, CLASSIFIER)


@pytest.mark.parametrize("modality", [CLASSIFIER, LM, DIFFUSION])
def test_shared_keys_pass(modality):
    cfg = load_section(DistillConfig, {"s": {"seed": 3, "epochs": 2, "batch_size": 8, "lr": 0.1}}, "s", {"method": "kd"})
    check_modality(cfg, modality)
    check_modality(load_section(EvaluateConfig, {}, "s", {"seed": 1}), modality)
    scmoe = load_section(EvaluateConfig, {}, "s", {"scmoe_alpha": 0.2})  # SCMoE decoding is an LM setting
    if modality == LM:
        check_modality(scmoe, modality)
    else:
        with pytest.raises(DistilError, match="scmoe_alpha"):
            check_modality(scmoe, modality)


@pytest.mark.parametrize("modality", [CLASSIFIER, LM, DIFFUSION])
def test_nested_sub_sections_always_pass(modality):
    params = {"s": {"model": {"width": 4}, "lm": {"hidden": 8}, "diffusion": {"width": 16}}}
    cfg = load_section(DistillConfig, params, "s", {"model": {"depth": 2}})
    check_modality(cfg, modality)


def test_config_built_in_code_counts_non_default_values():
    with pytest.raises(DistilError, match="'lmbda' is for language-model"):
        check_modality(DistillConfig(lmbda=0.3), CLASSIFIER)
    with pytest.raises(DistilError, match="'augment' is for classifier"):
        check_modality(DistillConfig(augment="weak"), LM)
    with pytest.raises(DistilError, match="'step_counts' is for diffusion"):
        check_modality(EvaluateConfig(step_counts=[1, 2]), LM)
    for modality in EVERY:
        check_modality(DistillConfig(), modality)
        check_modality(SelectConfig(), modality)
        check_modality(EvaluateConfig(), modality)
    check_modality(DistillConfig(lmbda=0.5), CLASSIFIER)  # the default value is not "given"
    check_modality(DistillConfig(model=ModelConfig(width=3), lm=LMConfig(hidden=8)), DIFFUSION)
    check_modality(DistillConfig(lmbda=0.3, epochs=4), LM)


def test_every_only_names_known_modalities():
    for cls in STAGES:
        for f in dataclasses.fields(cls):
            only = f.metadata.get("only", EVERY)
            assert only and set(only) <= set(EVERY), f"{cls.__name__}.{f.name}: {only}"
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    assert set(MODALITY_NAMES) == set(EVERY)


FIELDS = [(cls, f) for cls in STAGES for f in dataclasses.fields(cls)]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FIELDS), st.sampled_from(EVERY), st.sampled_from(["set", "section", "shared"]))
def test_a_setting_is_refused_exactly_for_the_modalities_that_do_not_read_it(case, modality, how):
    cls, f = case
    value = {f.name: _plain(_default(f))}
    if how == "set":
        cfg = load_section(cls, {}, "s", value)
    else:
        cfg = load_section(cls, {"s": value}, "s", shared=how == "shared")
    nested = dataclasses.is_dataclass(_default(f)) and f.name in PER_MODALITY  # one per modality, side by side
    refused = how != "shared" and modality not in f.metadata.get("only", EVERY) and not nested
    if refused:
        with pytest.raises(DistilError, match=f"setting '{f.name}' is for .*not {MODALITY_NAMES[modality]}"):
            check_modality(cfg, modality)
    else:
        check_modality(cfg, modality)


def test_property_covers_every_kind_of_field():
    kinds = {tuple(f.metadata.get("only", EVERY)) for _, f in FIELDS}
    assert {EVERY, (CLASSIFIER,), (LM,), (DIFFUSION,), (CLASSIFIER, LM)} <= kinds
    nested = {"model", "lm", "diffusion", "teacher", "lora", "reward", "qcrd", "agent"}
    assert {f.name for _, f in FIELDS if dataclasses.is_dataclass(_default(f))} == nested


# ---- through the CLI ---------------------------------------------------------------------


def _one_line_naming(result, *words):
    out = result.output.strip()
    assert len([line for line in out.splitlines() if line.strip()]) == 1, out
    for w in words:
        assert w in out, out


def test_cli_set_of_an_lm_key_on_classifier_data(cli, tmp_path):
    out = tmp_path / "student"
    result = cli.fails("distill", "--data", "digits", "--set", "lmbda=0.3", "--out", out, "-q", match="setting 'lmbda'")
    _one_line_naming(result, "'lmbda'", "language-model students", "not classifier students")
    assert not out.exists() and not out.with_name("student.partial").exists()


def test_cli_the_shared_default_section_may_hold_other_modalities_keys(tmp_path):
    cli = Cli(write_params(tmp_path, distill={"lmbda": 0.3, "grad_accum": 2}))
    cli.ok("distill", "--method", "ce", "--data", "digits", "--out", tmp_path / "student", "-q")
    assert (tmp_path / "student" / ".manifest.json").exists()


def test_cli_a_section_named_with_section_is_checked(tmp_path):
    cli = Cli(write_params(tmp_path, distill={"lmbda": 0.3}, mine={"method": "kd", "lmbda": 0.3}))
    out = tmp_path / "student"
    result = cli.fails("distill", "--section", "mine", "--data", "digits", "--out", out, "-q", match="setting 'lmbda'")
    _one_line_naming(result, "language-model")
    # naming the default section explicitly makes it this run's section
    cli.fails("distill", "--section", "distill", "--data", "digits", "--out", out, "-q", match="setting 'lmbda'")
    assert not out.exists()


def test_cli_options_count_as_given(cli, tiny_run, tmp_path):
    out = tmp_path / "x"
    cli.fails("generate-teacher-data", "--teacher", tiny_run["teacher"], "--data", "digits", "--steps", "5",
              "--out", out, "-q", match="setting 'steps' is for diffusion teachers, not classifier teachers")  # fmt: skip
    cli.fails("evaluate", "--model", tiny_run["teacher"], "--data", tiny_run["tdata"], "--decode", "scmoe",
              "--out", out, "-q", match="setting 'decode' is for language-model evaluations")  # fmt: skip
    cli.fails("select", tiny_run["tdata"], "--set", "min_agreement=0.5", "--out", out, "-q",
              match="setting 'min_agreement' is for language-model selections")  # fmt: skip
    cli.fails("cascade", "--student", tiny_run["teacher"], "--teacher", tiny_run["teacher"], "--data", tiny_run["tdata"],
              "--online", "--out", out, match="setting 'online' is for language-model cascades")  # fmt: skip
    assert not out.exists()


def test_cli_a_dotted_set_reaches_the_data_section_not_the_stage(cli, tmp_path):
    cli.fails("distill", "--data", "digits", "--set", "data.nope=1", "--out", tmp_path / "s", "-q",
              match="unknown key(s) nope in params section 'data'")  # fmt: skip


def test_data_config_keys_are_shared():
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("only", EVERY) == EVERY, f.name


def test_only_the_settings_every_modality_reads_are_untagged():
    """A stage setting tagged for every modality must be one that all three really read;
    anything else left untagged would be silently ignored by the others."""
    import dataclasses

    from stages import config

    shared = {"method", "epochs", "batch_size", "lr", "weight_decay", "seed"}
    for cls in (GenerateTeacherDataConfig, SelectConfig, DistillConfig, CascadeConfig, EvaluateConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("only", config.EVERY) == config.EVERY:
                assert f.name in shared, f"{cls.__name__}.{f.name} declares no modality"
