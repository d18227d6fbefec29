"""``distil doctor PATH``: verify an artifact on disk and say how to repair what is wrong.

PATH is a table (teacher data, a selection, cascade decisions, prompts, a demonstration
bank, diffusion trajectories), a model directory, a cascade or an evaluation. The checks:
the manifest (present, ``schema_version``, a known ``kind``), the parts against the
manifest's ``parts`` and ``rows``, each part's schema, NaN / inf in float columns and
tensors, unreadable Parquet / safetensors / JSON, the ``content_hash`` against the files,
the files each kind needs, and what a killed run leaves beside PATH (``<PATH>.partial``,
``<PATH>.old-*``). Tables are streamed batch by batch and tensors read one at a time.

Findings are data, not errors: the command prints them all, one line each, and exits 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.artifacts import (
    CASCADE_DECISIONS,
    CLASSIFIER_TEACHER_DATA,
    DECISIONS,
    DIFFUSION_TEACHER_DATA,
    ICD_BANK,
    KIND_MODALITY,
    LM_CASCADE_DECISIONS,
    LM_SELECTION,
    LM_TEACHER_DATA,
    MANIFEST,
    SCHEMA_VERSION,
    SELECTION,
    Kind,
    read_manifest,
)
from stages.doctor.files import check_hash, check_json, check_tensors
from stages.doctor.findings import Finding, rerun
from stages.doctor.tables import check_table
from stages.errors import DistilError
from stages.tasks.reasoning import PROMPTS

TABLE_SCHEMAS = {
    Kind.TEACHER_DATA: CLASSIFIER_TEACHER_DATA, Kind.SELECTION: SELECTION, Kind.CASCADE_DECISIONS: CASCADE_DECISIONS,
    Kind.LM_TEACHER_DATA: LM_TEACHER_DATA, Kind.LM_SELECTION: LM_SELECTION, Kind.LM_PROMPTS: PROMPTS,
    Kind.LM_CASCADE_DECISIONS: LM_CASCADE_DECISIONS, Kind.ICD_BANK: ICD_BANK,
    Kind.DIFFUSION_TEACHER_DATA: DIFFUSION_TEACHER_DATA,
}  # fmt: skip
"""The schema every table kind's parts must satisfy (extra columns allowed, as readers allow)."""

REQUIRED_FILES = {
    Kind.MODEL: ("config.json", "model.safetensors"), Kind.LM_MODEL: ("config.json",), Kind.GENERATOR: ("model_index.json",),
    Kind.EVALUATION: ("metrics.json",), Kind.GENERATOR_EVALUATION: ("metrics.json",),
    Kind.LM_CASCADE: ("policy.json", "metrics.json", f"{DECISIONS}/{MANIFEST}"),
}  # fmt: skip
"""Files a directory of each non-table kind cannot do without."""

MODELS = (Kind.MODEL, Kind.LM_MODEL, Kind.GENERATOR)
CLASSIFIER_CASCADE = ("policy.json", "metrics.json")
"""A classifier cascade has no manifest of its own: its ``decisions/`` table carries it."""


@dataclass
class Report:
    """What ``doctor`` found at ``path``; ``checked`` says what a healthy artifact was checked for."""

    path: Path
    findings: list[Finding]
    checked: str

    @property
    def ok(self) -> bool:
        return not self.findings


def run(path: Path) -> Report:
    """Every check that applies to what ``path`` is; a missing or unreadable artifact is a finding too."""
    path = Path(path)
    if path.name.endswith(".partial"):
        final = path.with_name(path.name.removesuffix(".partial"))
        return Report(path, [Finding(path, "is the unfinished output of a killed run, not an artifact",
                                     f"rerun the command that writes {final} to resume it, or delete {path}")], "")  # fmt: skip
    leftovers = _leftovers(path)
    if not path.exists():
        return Report(path, [Finding(path, "does not exist", "check the path, or run the stage that writes it"), *leftovers], "")
    if path.is_file():
        findings = check_tensors(path, "regenerate it") if path.suffix == ".safetensors" else [
            Finding(path, "is a file, not an artifact directory", "point at a table, model, cascade or evaluation directory")
        ]  # fmt: skip
        return Report(path, findings + leftovers, "safetensors file")
    findings, checked = _directory(path)
    return Report(path, findings + leftovers, checked)


def _leftovers(path: Path) -> list[Finding]:
    """What a killed run leaves beside PATH: its partial (resumable) or the previous output
    that an interrupted commit had moved aside."""
    found = []
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        found.append(Finding(partial, f"a killed run left this unfinished output of {path.name}",
                             f"{rerun(_manifest_or_empty(path))} (it resumes from here), or delete {partial}"))  # fmt: skip
    for old in sorted(path.parent.glob(f"{path.name}.old-*")):
        found.append(Finding(old, f"an interrupted commit left this previous output of {path.name}", f"delete {old}"))
    return found


def _manifest_or_empty(directory: Path) -> dict[str, Any]:
    try:
        manifest = read_manifest(directory) if directory.is_dir() else {}
    except DistilError:
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _directory(path: Path) -> tuple[list[Finding], str]:
    try:
        manifest = read_manifest(path)
    except DistilError:
        return [Finding(path / MANIFEST, "is not valid JSON", "rerun the command that wrote it")], ""
    if not isinstance(manifest, dict):
        return [Finding(path / MANIFEST, "is not a JSON object", "rerun the command that wrote it")], ""
    if not manifest:
        if (path / DECISIONS / MANIFEST).is_file():
            return _classifier_cascade(path)
        return [Finding(path, f"has no {MANIFEST}: distil did not write it, or its run did not finish",
                        "rerun the command that writes it")], ""  # fmt: skip
    return _artifact(path, manifest)


def _artifact(path: Path, manifest: dict[str, Any]) -> tuple[list[Finding], str]:
    """Every check of a directory with a manifest, nested artifacts (``decisions/``, a bank) included."""
    fix, kind = rerun(manifest), manifest.get("kind")
    findings = []
    if manifest.get("schema_version") != SCHEMA_VERSION:
        findings.append(Finding(path / MANIFEST, f"schema_version {manifest.get('schema_version')!r}, this distil "
                                f"reads {SCHEMA_VERSION}", f"regenerate it with this distil: {fix}"))  # fmt: skip
    if kind not in KIND_MODALITY:
        known = ", ".join(sorted(KIND_MODALITY))
        return [*findings, Finding(path / MANIFEST, f"unknown kind {kind!r} (distil writes {known})", fix)], ""
    checked = [f"{kind} ({KIND_MODALITY[kind]})"]
    if kind in TABLE_SCHEMAS:
        rows, table_findings = check_table(path, manifest, TABLE_SCHEMAS[kind], fix)
        findings += table_findings
        checked.append(f"{rows} rows in {len(list(path.glob('part-*.parquet')))} part(s)")
    required = REQUIRED_FILES.get(kind, ())
    if kind == Kind.LM_MODEL and (path / "adapter_config.json").is_file():  # a LoRA student: its adapter, in PEFT's format
        required = ("adapter_config.json", "adapter_model.safetensors")
    findings += [Finding(path / f, "is missing", fix) for f in required if not (path / f).is_file()]
    findings += [Finding(path / s, "is a trajectory shard the manifest lists but missing", fix)
                 for s in manifest.get("shards", []) if not (path / s).is_file()]  # fmt: skip
    nested = _nested(path)
    tensors = [f for f in sorted(path.rglob("*.safetensors")) if not _inside(f, nested)]
    if kind in MODELS and not tensors:
        findings.append(Finding(path, "holds no *.safetensors weights", fix))
    for f in tensors:
        findings += check_tensors(f, fix)
    for f in sorted(path.rglob("*.json")):
        if f.name != MANIFEST and not _inside(f, nested):
            findings += check_json(f, fix)
    matches, hash_findings = check_hash(path, manifest, fix)
    findings += hash_findings
    checked += [f"{len(tensors)} safetensors file(s) finite" if tensors else "",
                {True: "content hash matches", None: "no content hash recorded"}.get(matches, "")]  # fmt: skip
    for inner in nested:
        inner_findings, inner_checked = _directory(inner)
        findings += inner_findings
        checked.append(f"{inner.relative_to(path)}: {inner_checked}")
    return findings, ", ".join(c for c in checked if c)


def _classifier_cascade(path: Path) -> tuple[list[Finding], str]:
    fix = rerun(_manifest_or_empty(path / DECISIONS))
    findings, checked = _directory(path / DECISIONS)
    for name in CLASSIFIER_CASCADE:
        findings += check_json(path / name, fix) if (path / name).is_file() else [Finding(path / name, "is missing", fix)]
    return findings, f"classifier cascade, {DECISIONS}: {checked}"


def _nested(path: Path) -> list[Path]:
    """The outermost directories below ``path`` with a manifest of their own: checked as artifacts."""
    inner = sorted(m.parent for m in path.rglob(MANIFEST) if m.parent != path)
    return [d for d in inner if not any(o in d.parents for o in inner)]


def _inside(f: Path, dirs: list[Path]) -> bool:
    return any(d in f.parents for d in dirs)
