"""Bad input as a matrix over the five commands and three modalities.

Every case runs ``distil ...`` through typer's CliRunner and must end the same way: exit
code 2, exactly one line on stderr that names the problem and how to fix it, no traceback,
and nothing written beside ``--out`` (no output folder, no ``.partial``). The cases that
``tests/contract/test_bad_input.py`` already holds are not repeated here.

Root reads and writes through any permission bit, so the unreadable-file and read-only
cases drop root's two permission-override capabilities for the duration of the command
(``no_permission_override``): the kernel then refuses as it refuses every other user. The
full-disk case mounts a 32 KiB tmpfs inside an unprivileged user + mount namespace
(``unshare -rm``, no root needed), and is skipped where the kernel forbids that.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Cli, write_params

from stages.artifacts import MANIFEST

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
LM_SIZE = ["--set", "lm.hidden=16", "--set", "lm.layers=1", "--set", "lm.heads=2", "--set", "batch_size=16", "--set", "epochs=1"]
LM_DATA = ["--set", "data.sizes=[40,8,8]"]


# ---- the world the cases spoil: one small model and table of each modality --------------


@pytest.fixture(scope="module")
def world(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """The session's classifier run plus two LMs of different vocabularies, LM teacher data,
    a diffusion teacher and its trajectories: each trained for a step or two."""
    root = tmp_path_factory.mktemp("matrix")
    cli = Cli(write_params(root))
    w = {**tiny_run, "lm": root / "lm", "lm_other_vocab": root / "lm2", "lm_tdata": root / "lm_tdata",
         "gen": root / "gen", "gen_tdata": root / "gen_tdata"}  # fmt: skip
    cli.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", w["lm"], *LM_DATA, *LM_SIZE,
           "--set", "lm.vocab_size=300", "-q")  # fmt: skip
    cli.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", w["lm_other_vocab"], *LM_DATA, *LM_SIZE,
           "--set", "lm.vocab_size=340", "-q")  # fmt: skip
    cli.ok("generate-teacher-data", "--teacher", w["lm"], "--data", "basic_arithmetic", "--out", w["lm_tdata"], *LM_DATA,
           "--set", "top_k=4", "--set", "max_new_tokens=4", "-q")  # fmt: skip
    cli.ok("distill", "--method", "denoise", "--data", "moons", "--out", w["gen"], "--set", "data.sizes=[200,40,40]",
           "--set", "steps=4", "--set", "diffusion.width=16", "--set", "diffusion.depth=1", "--set", "batch_size=64", "-q")  # fmt: skip
    cli.ok("generate-teacher-data", "--teacher", w["gen"], "--data", "moons", "--out", w["gen_tdata"], "--set", "steps=2",
           "--set", "noise_samples=16", "--set", "shard_samples=16", "-q")  # fmt: skip
    return w


# ---- spoiling helpers: each writes one bad input under tmp and returns its path ---------------


def _text(tmp: Path, name: str, text: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _table(tmp: Path, name: str, columns: dict) -> Path:
    path = tmp / name
    pq.write_table(pa.table(columns), path)
    return path


def _rewrite(src: Path, dst: Path, fn: Callable[[pa.Table], pa.Table]) -> Path:
    """A copy of a distil table whose parts went through ``fn``; the manifest kept."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("part-*.parquet"))
    for part in sorted(src.glob("part-*.parquet")):
        pq.write_table(fn(pq.read_table(part)), dst / part.name)
    return dst


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _copy(src: Path, dst: Path, files: dict[str, str | bytes] | None = None) -> Path:
    """A copy of a folder with some of its files replaced or added (``{name: content}``)."""
    shutil.copytree(src, dst)
    for name, content in (files or {}).items():
        (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


def _unreadable(path: Path) -> Path:
    for f in [path] if path.is_file() else sorted(path.glob("part-*.parquet")):
        f.chmod(0)
    return path


def _digits_csv(tmp: Path, n_features: int = 64, rows: int = 30, label=lambda i: i % 3, extra: str = "") -> Path:
    rng = np.random.default_rng(0)
    head = ",".join([f"f{i}" for i in range(n_features)] + ["label"])
    body = [",".join([f"{v:.2f}" for v in rng.random(n_features)] + [str(label(i))]) for i in range(rows)]
    return _text(tmp, "table.csv", "\n".join([head, *body]) + "\n" + extra)


def _prompts_csv(tmp: Path, rows: list[tuple[str, str, str]]) -> Path:
    return _text(tmp, "prompts.csv", "prompt,answer,split\n" + "".join(f"{p},{a},{s}\n" for p, a, s in rows))


GARBAGE = bytes(range(256)) * 8


# ---- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[dict, Path], Sequence]
    """The command line without --out, given the world and a scratch folder for spoiled inputs."""
    says: str
    """A regular expression (case-insensitive) the one error line must match: the problem, then the fix."""
    unprivileged: bool = False
    """Run without root's permission override: for unreadable inputs and read-only outputs."""
    locked_out: bool = False
    """--out lies in a read-only folder."""


def _tdata_logits_as_text(w, tmp):
    return _rewrite(w["tdata"], tmp / "t", lambda t: _set(t, "logits", pa.array([[str(v) for v in r] for r in
                                                                                   t.column("logits").to_pylist()])))  # fmt: skip


def _tdata_ragged_logits(w, tmp):
    return _rewrite(w["tdata"], tmp / "t", lambda t: _set(t, "logits", pa.array(
        [r[: 5 + i % 2] for i, r in enumerate(t.column("logits").to_pylist())], type=pa.list_(pa.float32()))))  # fmt: skip


def _tdata_inf_features(w, tmp):
    def poison(t):
        rows = t.column("features").to_pylist()
        rows[0][0] = float("inf")
        return _set(t, "features", pa.array(rows, type=pa.list_(pa.float32())))

    return _rewrite(w["selected"], tmp / "t", poison)


def _lm_tdata_without_token_ids(w, tmp):
    return _rewrite(w["lm_tdata"], tmp / "t", lambda t: t.drop(["token_ids"]))


CASES = [
    # generate-teacher-data ---------------------------------------------------------------
    Case("gtd-classifier-data-path-missing", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data", tmp / "nope.csv"],
         r"neither a built-in task.*nor an existing file.*check the path"),
    Case("gtd-classifier-weights-corrupt", lambda w, tmp: ["generate-teacher-data", "-t", _copy(w["teacher"], tmp / "m",
         {"model.safetensors": GARBAGE}), "--data", "digits"], r"not a readable safetensors file.*regenerate"),
    Case("gtd-classifier-config-not-json", lambda w, tmp: ["generate-teacher-data", "-t", _copy(w["teacher"], tmp / "m",
         {"config.json": "{not json"}), "--data", "digits"], r"config.*(json|distil model).*"),
    Case("gtd-classifier-csv-is-not-csv", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data",
         _text(tmp, "x.csv", GARBAGE)], r"cannot read .*x\.csv as CSV \(CSV parse error.*\); pass a \.parquet/\.csv file"),
    Case("gtd-classifier-parquet-is-garbage", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data",
         _text(tmp, "x.parquet", GARBAGE)], r"cannot read .*x\.parquet as Parquet \(Parquet magic bytes.*\); pass a \.parquet/\.csv"),
    Case("gtd-classifier-csv-unreadable", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data",
         _unreadable(_digits_csv(tmp))], r"permission denied.*table\.csv.*check its permissions", unprivileged=True),
    Case("gtd-classifier-no-label-column", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data",
         _table(tmp, "x.parquet", {"a": [1.0, 2.0], "b": [3.0, 4.0]})], r"no label column 'label'.*--label"),
    Case("gtd-classifier-wrong-feature-count", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data",
         _digits_csv(tmp, n_features=3)], r"expects inputs of shape \[1, 8, 8\] but .*table\.csv has \[3\]; use data with matching"),
    Case("gtd-classifier-unknown-split", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data", "digits",
         "--set", "splits=train,valid"], r"params generate_teacher_data\.splits must be one of train, dev, test, got valid"),
    Case("gtd-classifier-out-read-only", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data", "digits"],
         r"cannot write --out .*permission denied.*choose a writable location", unprivileged=True, locked_out=True),
    Case("gtd-lm-teacher-on-classifier-data", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "--data", "digits"],
         r"--teacher .*lm is a language model, not a classifier, but the data is classifier data; pass a classifier"),
    Case("gtd-classifier-teacher-on-lm-task", lambda w, tmp: ["generate-teacher-data", "-t", w["teacher"], "--data",
         "basic_arithmetic", *LM_DATA], r"--teacher .*teacher is a classifier, not a language model, but the data is language-model data; pass a language model"),
    Case("gtd-lm-samples-out-of-range", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "--data", "basic_arithmetic",
         "--set", "samples=0"], r"params generate_teacher_data\.samples must be >= 1, got 0"),
    Case("gtd-lm-jsonl-is-garbage", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "--data",
         _text(tmp, "p.jsonl", '{"prompt": "a"\nnot json\n')], r"cannot read .*p\.jsonl as JSON lines.*one JSON object per line"),
    Case("gtd-lm-empty-prompt", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "--data",
         _prompts_csv(tmp, [("1+1", "2", "test"), (" ", "3", "test")])], r"1 prompt\(s\) are empty.*drop them"),
    Case("gtd-lm-prompt-split-unknown", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "--data",
         _prompts_csv(tmp, [("1+1", "2", "holdout")])], r"split column holds \['holdout'\].*train, dev, test"),
    Case("gtd-lm-unknown-decode", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "--data", "basic_arithmetic",
         *LM_DATA, "--decode", "magic"], r"unknown decode.*'magic'.*greedy"),
    Case("gtd-lm-teachers-of-different-vocabularies", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "-t",
         w["lm_other_vocab"], "--data", "basic_arithmetic", *LM_DATA], r"tokenizer|vocabular"),
    Case("gtd-lm-null-prompt", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "--data", _table(tmp, "p.parquet",
         {"prompt": ["1+1", None], "answer": ["2", "3"]})], r"1 prompt\(s\) are empty.*drop them"),
    Case("gtd-lm-prompt-column-of-lists", lambda w, tmp: ["generate-teacher-data", "-t", w["lm"], "--data", _text(tmp, "p.jsonl",
         '{"prompt": ["a", "b"]}\n')], r"column 'prompt' has type list<item: string>; it must hold text"),
    Case("gtd-diffusion-zero-steps", lambda w, tmp: ["generate-teacher-data", "-t", w["gen"], "--data", "moons", "--steps", "0"],
         r"params generate_teacher_data\.steps must be >= 1, got 0"),
    Case("gtd-diffusion-teacher-on-classifier-data", lambda w, tmp: ["generate-teacher-data", "-t", w["gen"], "--data", "digits"],
         r"generator|diffusion"),
    # select ------------------------------------------------------------------------------
    Case("select-classifier-part-unreadable", lambda w, tmp: ["select", _unreadable(_rewrite(w["tdata"], tmp / "t",
         lambda t: t))], r"permission denied.*part-00000\.parquet.*check its permissions", unprivileged=True),
    Case("select-classifier-manifest-not-json", lambda w, tmp: ["select", _copy(w["tdata"], tmp / "t",
         {MANIFEST: "{"})], r"not valid JSON.*regenerate"),
    Case("select-classifier-no-split-column", lambda w, tmp: ["select", _rewrite(w["tdata"], tmp / "t", lambda t: t.drop(["split"]))],
         r"no column 'split'.*pass a table produced by the right stage"),
    Case("select-classifier-logits-as-text", lambda w, tmp: ["select", _tdata_logits_as_text(w, tmp)],
         r"column 'logits' has type list<element: string>, expected list<item: float>; pass a table produced by the right stage"),
    Case("select-classifier-ragged-logits", lambda w, tmp: ["select", _tdata_ragged_logits(w, tmp)],
         r"rows have different lengths.*same size"),
    Case("select-classifier-folder-without-parts", lambda w, tmp: ["select", _copy(w["teacher"], tmp / "m")],
         r"holds no Parquet parts|not teacher data|teacher data"),
    Case("select-classifier-setting-on-lm-data", lambda w, tmp: ["select", w["lm_tdata"], "--set", "threshold=0.5"],
         r"setting 'threshold' is for classifier selections, not language-model selections.*drop it"),
    Case("select-lm-unknown-filter", lambda w, tmp: ["select", w["lm_tdata"], "--by", "majority+magic"], r"unknown.*magic"),
    Case("select-lm-uncertain-without-student", lambda w, tmp: ["select", w["lm_tdata"], "--by", "uncertain"], r"--student"),
    Case("select-lm-min-agreement-out-of-range", lambda w, tmp: ["select", w["lm_tdata"], "--by", "majority",
         "--set", "min_agreement=2"], r"params select\.min_agreement must be in \[0, 1\], got 2"),
    Case("select-lm-no-token-ids", lambda w, tmp: ["select", _lm_tdata_without_token_ids(w, tmp), "--by", "majority"],
         r"no column 'token_ids'"),
    Case("select-lm-second-part-garbage", lambda w, tmp: ["select", _copy(w["lm_tdata"], tmp / "t", {"part-00001.parquet": GARBAGE}),
         "--by", "majority"], r"part-00001\.parquet is not a Parquet file.*pass LM teacher data produced by distil"),
    Case("select-diffusion-trajectories", lambda w, tmp: ["select", w["gen_tdata"]],
         r"does not support diffusion inputs.*distil from them directly"),
    # distill -----------------------------------------------------------------------------
    Case("distill-classifier-text-feature", lambda w, tmp: ["distill", "--method", "ce", "--data", _text(tmp, "x.csv",
         "a,b,label\n" + "".join(f"{i},x{i},{i % 2}\n" for i in range(10)))], r"feature column 'b' has type string.*numeric"),
    Case("distill-classifier-ragged-list-features", lambda w, tmp: ["distill", "--method", "ce", "--data", _table(tmp, "x.parquet",
         {"x": [[1.0, 2.0], [1.0], [3.0, 4.0], [5.0, 6.0]], "label": [0, 1, 0, 1]})], r"different lengths.*same size"),
    Case("distill-classifier-nan-in-list-features", lambda w, tmp: ["distill", "--method", "ce", "--data", _table(tmp, "x.parquet",
         {"x": [[1.0, 2.0], [np.nan, 1.0], [3.0, 4.0], [5.0, 6.0]], "label": [0, 1, 0, 1]})], r"NaN or inf.*clean"),
    Case("distill-classifier-float-labels", lambda w, tmp: ["distill", "--method", "ce", "--data", _table(tmp, "x.parquet",
         {"a": [1.0, 2.0, 3.0, 4.0], "label": [0.5, 1.0, 0.0, 1.0]})], r"label column 'label' has type double.*integer class ids or strings"),
    Case("distill-classifier-negative-labels", lambda w, tmp: ["distill", "--method", "ce", "--data",
         _digits_csv(tmp, 4, label=lambda i: -(i % 2))], r"labels must be non-negative.*0\.\.C-1"),
    Case("distill-classifier-null-labels", lambda w, tmp: ["distill", "--method", "ce", "--data", _table(tmp, "x.parquet",
         {"a": [1.0, 2.0, 3.0, 4.0], "label": pa.array([0, None, 1, 1], pa.int64())})], r"label column 'label' has 1 empty value.*drop"),
    Case("distill-classifier-repeated-column", lambda w, tmp: ["distill", "--method", "ce", "--data", _text(tmp, "x.csv",
         "a,a,label\n" + "".join(f"{i},{i},{i % 2}\n" for i in range(8)))], r"repeats column name\(s\) 'a'; give every column"),
    Case("distill-classifier-no-feature-columns", lambda w, tmp: ["distill", "--method", "ce", "--data", _text(tmp, "x.csv",
         "label\n" + "".join(f"{i % 2}\n" for i in range(8)))], r"has no feature columns besides 'label'.*--features"),
    Case("distill-classifier-features-missing", lambda w, tmp: ["distill", "--method", "ce", "--data", _digits_csv(tmp, 4),
         "--features", "f0,f9"], r"no feature column\(s\) f9.*--features"),
    Case("distill-classifier-bad-split-values", lambda w, tmp: ["distill", "--method", "ce", "--data", _text(tmp, "x.csv",
         "a,label,part\n" + "".join(f"{i},{i % 2},{'train' if i % 3 else 'val'}\n" for i in range(12))), "--set",
         "data.split_column=part"], r"split column holds \['val'\].*train, dev, test"),
    Case("distill-classifier-empty-parquet", lambda w, tmp: ["distill", "--method", "ce", "--data", _table(tmp, "x.parquet",
         {"a": pa.array([], pa.float64()), "label": pa.array([], pa.int64())})], r"is empty.*at least one row"),
    Case("distill-classifier-csv-unreadable", lambda w, tmp: ["distill", "--method", "ce", "--data", _unreadable(_digits_csv(tmp))],
         r"permission denied.*table\.csv.*check its permissions", unprivileged=True),
    Case("distill-classifier-inf-in-teacher-features", lambda w, tmp: ["distill", "--method", "kd", "--data", _tdata_inf_features(w, tmp)],
         r"NaN or inf.*clean or drop"),
    Case("distill-classifier-out-read-only", lambda w, tmp: ["distill", "--method", "kd", "--data", w["selected"]],
         r"cannot write --out .*permission denied.*choose a writable location", unprivileged=True, locked_out=True),
    Case("distill-classifier-method-on-lm-task", lambda w, tmp: ["distill", "--method", "pskd", "--data", "basic_arithmetic"],
         r"method 'pskd' is not available for language models.*LM methods"),
    Case("distill-lm-method-on-classifier-data", lambda w, tmp: ["distill", "--method", "on-policy", "--data", "digits"],
         r"method 'on-policy' is a language-model method, but 'digits' is classifier data; choose a classifier method"),
    Case("distill-classifier-lm-as-live-teacher", lambda w, tmp: ["distill", "--method", "kd", "--data", "digits", "-t", w["lm"]],
         r"--teacher .*lm is a language model, not a classifier, but the data is classifier data"),
    Case("distill-classifier-teacher-missing", lambda w, tmp: ["distill", "--method", "kd", "--data", "digits", "-t", tmp / "none"],
         r"not a distil model|does not exist"),
    Case("distill-lm-kd-tokenizer-mismatch", lambda w, tmp: ["distill", "--method", "kd", "--data", w["lm_tdata"], *LM_SIZE,
         "--set", f"lm.init={w['lm_other_vocab']}"], r"compares token distributions.*use one tokenizer for both, a cross-tokenizer method.*or --method sft"),
    Case("distill-lm-on-policy-tokenizer-mismatch", lambda w, tmp: ["distill", "--method", "on-policy", "--data", w["lm_tdata"],
         "-t", w["lm"], *LM_SIZE, "--set", f"lm.init={w['lm_other_vocab']}"], r"compares token distributions.*use one tokenizer"),
    Case("distill-lm-init-is-a-classifier", lambda w, tmp: ["distill", "--method", "sft", "--data", "basic_arithmetic", *LM_DATA,
         *LM_SIZE, "--set", f"lm.init={w['teacher']}"], r"teacher is not a model transformers can load \(.*\); point at a folder"),
    Case("distill-lm-set-value-not-yaml", lambda w, tmp: ["distill", "--method", "sft", "--data", "basic_arithmetic",
         "--set", "lm.hidden=[1"], r"params 'distill\.lm\.hidden' must be int, got '\[1'"),
    Case("distill-lm-token-kd-on-prompts", lambda w, tmp: ["distill", "--method", "kd", "--data", "basic_arithmetic", *LM_DATA],
         r"needs LM teacher data with top-k log-probs.*generate-teacher-data"),
    Case("distill-lm-on-policy-without-teacher", lambda w, tmp: ["distill", "--method", "on-policy", "--data", w["lm_tdata"]],
         r"needs exactly one live teacher.*--teacher"),
    Case("distill-lm-unknown-task-in-mixture", lambda w, tmp: ["distill", "--method", "sft", "--data", "chain_sum+magic"],
         r"magic"),
    Case("distill-lm-hub-offline", lambda w, tmp: ["distill", "--method", "sft", "--data", "hf:nobody/nothing"],
         r"cannot load dataset 'nobody/nothing'.*local directory"),
    Case("distill-lm-classifier-setting", lambda w, tmp: ["distill", "--method", "sft", "--data", "basic_arithmetic", *LM_DATA,
         "--set", "augment=weak"], r"setting 'augment' is for classifier students, not language-model students"),
    Case("distill-diffusion-classifier-method", lambda w, tmp: ["distill", "--method", "kd", "--data", "moons"],
         r"method 'kd' does not train generators.*denoise"),
    Case("distill-diffusion-classifier-as-teacher", lambda w, tmp: ["distill", "--method", "consistency-distill", "--data", "moons",
         "-t", w["teacher"]], r"--teacher .*teacher is a classifier, not a diffusion model, but the data is diffusion data; pass a diffusion model"),
    Case("distill-diffusion-ema-out-of-range", lambda w, tmp: ["distill", "--method", "denoise", "--data", "moons", "--set",
         "diffusion.ema=1"], r"params distill\.diffusion\.ema must be in \[0, 1\), got 1\.0"),
    Case("distill-diffusion-empty-train", lambda w, tmp: ["distill", "--method", "denoise", "--data", "moons", "--set",
         "data.sizes=[0,4,4]"], r"data\.sizes must be three counts \[train, dev, test\] with train >= 1, got \[0, 4, 4\]"),
    # cascade -----------------------------------------------------------------------------
    Case("cascade-diffusion-student", lambda w, tmp: ["cascade", "-s", w["gen"], "-t", w["teacher"], "--data", w["tdata"]],
         r"does not support diffusion inputs.*distil evaluate"),
    Case("cascade-lm-student-classifier-teacher", lambda w, tmp: ["cascade", "-s", w["lm"], "-t", w["teacher"], "--data",
         w["lm_tdata"]], r"--teacher .*teacher is a classifier, not a language model, but the data is language-model data"),
    Case("cascade-classifier-student-lm-teacher", lambda w, tmp: ["cascade", "-s", w["teacher"], "-t", w["lm"], "--data",
         w["tdata"]], r"--teacher .*lm is a language model, not a classifier, but the data is classifier data"),
    Case("cascade-classifier-policy-file-not-json", lambda w, tmp: ["cascade", "-s", w["teacher"], "-t", w["teacher"], "--data",
         w["tdata"], "--policy-file", _text(tmp, "policy.json", "{")], r"policy\.json is not a cascade policy file; calibrate one with `distil cascade`"),
    Case("cascade-classifier-student-missing", lambda w, tmp: ["cascade", "-s", tmp / "none", "-t", w["teacher"], "--data",
         w["tdata"]], r"none is not a distil model \(needs config\.json and model\.safetensors\); train one"),
    Case("cascade-classifier-data-without-features", lambda w, tmp: ["cascade", "-s", w["teacher"], "-t", w["teacher"], "--data",
         _rewrite(w["tdata"], tmp / "t", lambda t: t.drop(["features"]))], r"has no column 'features'.*produced by the right stage"),
    Case("cascade-classifier-out-read-only", lambda w, tmp: ["cascade", "-s", w["teacher"], "-t", w["teacher"], "--data",
         w["tdata"]], r"cannot write --out .*permission denied.*choose a writable location", unprivileged=True, locked_out=True),
    Case("cascade-lm-unknown-policy", lambda w, tmp: ["cascade", "-s", w["lm"], "-t", w["lm"], "--data", w["lm_tdata"],
         "--policy", "magic"], r"unknown .*policy.*'magic'"),
    Case("cascade-lm-classifier-setting", lambda w, tmp: ["cascade", "-s", w["lm"], "-t", w["lm"], "--data", w["lm_tdata"],
         "--set", "views=3"], r"setting 'views' is for classifier cascades, not language-model cascades"),
    Case("cascade-lm-stop-confidence-out-of-range", lambda w, tmp: ["cascade", "-s", w["lm"], "-t", w["lm"], "--data",
         w["lm_tdata"], "--set", "stop_confidence=0.5"], r"params cascade\.stop_confidence must be in \(0\.5, 1\], got 0\.5"),
    # evaluate ----------------------------------------------------------------------------
    Case("evaluate-classifier-model-missing", lambda w, tmp: ["evaluate", "--model", tmp / "none", "--data", w["tdata"]],
         r"not a distil model|does not exist"),
    Case("evaluate-classifier-nothing-to-evaluate", lambda w, tmp: ["evaluate", "--data", w["tdata"]], r"nothing to evaluate.*--model"),
    Case("evaluate-diffusion-generator-with-classifier", lambda w, tmp: ["evaluate", "--model", w["gen"], "--model", w["teacher"], "--data",
         "moons"], r"evaluate generators .* on their own"),
    Case("evaluate-classifier-not-a-cascade", lambda w, tmp: ["evaluate", "--cascade", w["teacher"], "--data", w["tdata"]],
         r"teacher/decisions does not exist; check the path or run the stage that produces it"),
    Case("evaluate-diffusion-on-classifier-data", lambda w, tmp: ["evaluate", "--model", w["gen"], "--data", "digits"],
         r"data 'digits' is not generator data; use one of moons, .* or diffusion teacher data"),
    Case("evaluate-lm-on-classifier-data", lambda w, tmp: ["evaluate", "--model", w["lm"], "--data", w["tdata"]],
         r"--model .*lm is a language model, not a classifier, but the data is classifier data"),
    Case("evaluate-classifier-on-lm-data", lambda w, tmp: ["evaluate", "--model", w["teacher"], "--data", w["lm_tdata"]],
         r"--model .*teacher is a classifier, not a language model, but the data is language-model data"),
    Case("evaluate-classifier-unknown-split", lambda w, tmp: ["evaluate", "--model", w["teacher"], "--data", w["tdata"],
         "--set", "split=valid"], r"params evaluate\.split must be one of train, dev, test, got valid"),
    Case("evaluate-classifier-weights-unreadable", lambda w, tmp: ["evaluate", "--model", _unreadable(_copy(w["teacher"], tmp / "m")
         / "model.safetensors").parent, "--data", w["tdata"]], r"permission denied.*model\.safetensors.*check its permissions",
         unprivileged=True),
    Case("evaluate-classifier-wrong-feature-count", lambda w, tmp: ["evaluate", "--model", w["teacher"], "--data",
         _digits_csv(tmp, n_features=5)], r"expects inputs of shape \[1, 8, 8\] but .*table\.csv has \[5\]"),
    Case("evaluate-lm-unknown-decode", lambda w, tmp: ["evaluate", "--model", w["lm"], "--data", "basic_arithmetic", *LM_DATA,
         "--decode", "magic"], r"unknown decode.*'magic'.*greedy"),
    Case("evaluate-diffusion-model-index-not-json", lambda w, tmp: ["evaluate", "--model", _copy(w["gen"], tmp / "g",
         {"model_index.json": "{"}), "--data", "moons"],
         r"model_index\.json is not valid JSON; retrain or re-save the generator"),
    Case("evaluate-diffusion-step-counts-out-of-range", lambda w, tmp: ["evaluate", "--model", w["gen"], "--data", "moons",
         "--set", "step_counts=1,0"], r"params evaluate\.step_counts must be a list of numbers >= 1, got \[1, 0\]"),
]  # fmt: skip


# ---- running a case ---------------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def no_permission_override() -> Iterator[None]:
    """Within the block this thread honours permission bits even as root: CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH leave its effective set (they stay permitted, so they come back)."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3, this thread
    if not hasattr(libc, "capget") or libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("root here cannot drop its permission override (no capget)")
    saved = data[0].effective
    data[0].effective &= ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH))
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("root here cannot drop its permission override (capset refused)")
    try:
        yield
    finally:
        data[0].effective = saved
        assert libc.capset(ctypes.byref(header), data) == 0


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_clean(result, out: Path, before: list[str], says: str) -> None:
    """Exit 2, one stderr line matching ``says``, no traceback, nothing new beside --out."""
    shown = f"exit {result.exit_code}\nstderr: {result.stderr}\nstdout: {result.stdout}\n{result.exception!r}"
    assert result.exit_code == 2, shown
    assert "Traceback" not in result.output, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, shown
    assert re.search(says, lines[0], re.IGNORECASE), f"{lines[0]!r} does not match {says!r}"
    assert not out.exists() and not out.with_name(out.name + ".partial").exists(), shown
    assert _listing(out.parent) == before, f"written beside --out: {sorted(set(_listing(out.parent)) - set(before))}"


def test_the_matrix_spans_every_command_and_modality():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    spanned = {tuple(c.id.split("-")[:2]) for c in CASES}
    commands, modalities = ("gtd", "select", "distill", "cascade", "evaluate"), ("classifier", "lm", "diffusion")
    assert spanned == {(c, m) for c in commands for m in modalities}, spanned


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(world, tmp_path, case):
    scratch = tmp_path / "in"
    scratch.mkdir()
    cli = Cli(write_params(scratch))
    argv = [str(a) for a in case.argv(world, scratch)]
    parent = tmp_path / ("locked" if case.locked_out else "outs")
    parent.mkdir()
    out = parent / "o"
    before = _listing(parent)
    if case.locked_out:
        parent.chmod(0o555)
    try:
        with no_permission_override() if case.unprivileged else contextlib.nullcontext():
            result = cli(*argv, "--out", out, "-q")
    finally:
        parent.chmod(0o755)
        for f in scratch.rglob("*"):
            if f.is_file():
                f.chmod(0o644)
    assert_clean(result, out, before, case.says)


# ---- a full disk --------------------------------------------------------------------------------

FULL_DISK = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import Cli
r = Cli(Path({params!r}))("generate-teacher-data", "-t", {teacher!r}, "--data", "digits", "--out", {out!r},
                          "--set", "data.limit=0", "-q")
print(json.dumps([r.exit_code, r.stderr]), flush=True)
"""


def test_a_full_disk_is_one_line_exit_2_and_no_partial(tiny_run, tmp_path):
    """Teacher data for 1797 digits does not fit a 32 KiB tmpfs: a write fails with ENOSPC.
    The tmpfs lives in a user + mount namespace of the child process alone."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged user + mount namespace here to mount a small tmpfs in")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "o"
    script = FULL_DISK.format(tests=str(Path(__file__).parents[1]), params=str(write_params(tmp_path)),
                              teacher=str(tiny_run["teacher"]), out=str(out))  # fmt: skip
    shell = f"mount -t tmpfs -o size=32k tmpfs {disk} && {sys.executable} -c {shlex.quote(script)} && ls -A {disk}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, *left = proc.stdout.strip().splitlines()
    exit_code, stderr = json.loads(first)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code == 2 and len(lines) == 1, stderr
    assert re.search(r"cannot write --out .*no space left on device; free space or choose", lines[0], re.IGNORECASE), lines[0]
    assert left == [], f"left on the full disk: {left}"
