"""The one answer to "which modality is this?": classifier, language model (lm) or
diffusion generator, for a ``--data`` source and for a model directory.

Each input is looked at once: a distil artifact by its manifest's ``kind`` (read once), a
built-in name by its registry, a user file by its suffix and, for Parquet and CSV, its
columns (a ``prompt`` column means LM prompts). The routers in ``stages/<command>.py``
call these functions and nothing else decides the modality.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.artifacts import KIND_MODALITY, MANIFEST, read_manifest
from stages.config import DataConfig
from stages.errors import DistilError

CLASSIFIER, LM, DIFFUSION = "classifier", "lm", "diffusion"
MODALITIES = (CLASSIFIER, LM, DIFFUSION)
NAMES = {CLASSIFIER: "classifier", LM: "language-model", DIFFUSION: "diffusion"}
"""How a message names each modality."""
MODELS = {CLASSIFIER: "classifier", LM: "language model", DIFFUSION: "diffusion model"}
"""How a message names a model of each modality."""


def of_data(source: str | Path, data: DataConfig | None = None) -> str:
    """The modality of a ``--data`` source: a distil table, a built-in name or a user file (a
    table with a prompt or a ``messages`` column is LM data)."""
    from stages.tasks import GENERATOR_DATA
    from stages.tasks.mixture import task_names

    name, path = str(source), Path(source)
    if path.is_dir() and (path / MANIFEST).exists():
        return KIND_MODALITY.get(str(read_manifest(path).get("kind", "")), CLASSIFIER)
    if name in GENERATOR_DATA and not path.exists():
        return DIFFUSION
    if task_names(source) or name.startswith("hf:") or path.suffix.lower() in (".jsonl", ".json"):
        return LM
    prompt = (data or DataConfig()).prompt_column
    if path.is_file() and path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return LM if {prompt, "messages"} & set(pq.read_schema(path).names) else CLASSIFIER
        except (pa.ArrowInvalid, OSError):
            return CLASSIFIER
    if path.is_file() and path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", errors="replace") as fh:
            return LM if {prompt, "messages"} & set(fh.readline().strip().split(",")) else CLASSIFIER
    return CLASSIFIER


def is_url(spec: str | Path) -> bool:
    """An OpenAI-compatible server's base URL (``http://HOST:PORT/v1``): a language model."""
    return str(spec).startswith(("http://", "https://"))


def as_spec(spec: str | Path) -> str | Path:
    """A model on the command line: a URL stays text, anything else is a path."""
    return str(spec) if is_url(spec) else Path(spec)


def of_model(path: str | Path) -> str | None:
    """The modality of a model directory: a diffusers folder (``model_index.json``), a
    transformers LM (its ``config.json`` names a ``model_type``, or a PEFT adapter's
    ``adapter_config.json``: a LoRA student) or a built-in classifier.
    None for what is not a directory (a shipped or hub model name); LM for a server URL."""
    if is_url(path):
        return LM
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "model_index.json").is_file():
        return DIFFUSION
    if (path / "adapter_config.json").is_file():
        return LM
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return CLASSIFIER
    return LM if isinstance(config, dict) and "model_type" in config else CLASSIFIER


def _plainly(path: Path) -> str | None:
    """The modality a folder plainly holds a model of (a distil classifier's config names its
    ``arch``), else None: a folder of nothing recognisable is its loader's to judge."""
    kind = of_model(path)
    if kind == CLASSIFIER:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return CLASSIFIER if isinstance(config, dict) and "arch" in config else None
    return kind


def check_models(modality: str, **roles: Path | list[Path] | tuple | None) -> None:
    """Refuse a model of another modality than the data's, naming both (a language model as
    a classifier's --teacher, a classifier as an LM cascade's teacher), before any loader
    tries to read it as what it is not. ``roles``: option name -> folder(s)."""
    for role, paths in roles.items():
        for path in paths if isinstance(paths, (list, tuple)) else [paths] if paths else []:
            kind = LM if is_url(path) else _plainly(Path(path))
            if kind is not None and kind != modality:
                raise DistilError(
                    f"--{role} {path} is a {MODELS[kind]}, not a {MODELS[modality]}, but the data is {NAMES[modality]} data; "
                    f"pass a {MODELS[modality]}, or {NAMES[kind]} data for this one"
                )


def of_method(name: str) -> tuple[str, ...]:
    """The modalities whose method table has ``name`` (kd is a classifier and an LM method)."""
    from stages.classifier.methods import METHODS
    from stages.diffusion.methods import DIFFUSION_METHODS
    from stages.lm.methods import LM_METHODS

    tables = {CLASSIFIER: METHODS, LM: LM_METHODS, DIFFUSION: DIFFUSION_METHODS}
    return tuple(m for m, table in tables.items() if name in table)


def refuse(command: str, modality: str, why: str = "") -> DistilError:
    """The one line for a command a modality does not support."""
    return DistilError(f"`distil {command}` does not support {NAMES[modality]} inputs" + (f": {why}" if why else ""))
