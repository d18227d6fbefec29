"""The contract between stages, re-exported from three modules:

- ``schemas``: every Parquet schema and manifest kind, as code;
- ``store``: atomic outputs (``Output``, ``TableWriter``), safetensors state, readers
  that validate on read;
- ``provenance``: content hashes, run fingerprints, the code version, manifests (content
  apart from ``timing``).

``adapters`` (imported by name, as it pulls in peft when used) reads PEFT adapter folders.
"""

from stages.artifacts.provenance import (
    TIMING,
    artifact_hash,
    code_version,
    file_hash,
    fingerprint,
    is_timing,
    join_timing,
    split_timing,
    write_manifest,
)
from stages.artifacts.schemas import (
    CASCADE_DECISIONS,
    CLASSIFIER_TEACHER_DATA,
    DECISIONS,
    DIFFUSION_TEACHER_DATA,
    EXAMPLES,
    ICD_BANK,
    KIND_MODALITY,
    LM_CASCADE_DECISIONS,
    LM_SELECTION,
    LM_TEACHER_DATA,
    MANIFEST,
    OPTIONAL,
    SCHEMA_VERSION,
    SELECTION,
    Kind,
    is_optional,
    optional_field,
    with_optional,
)
from stages.artifacts.store import (
    Output,
    TableWriter,
    check_schema,
    inspect_table,
    iter_batches,
    list_column_to_numpy,
    load_state,
    load_tensors,
    read_any_table,
    read_manifest,
    read_table,
    save_state,
    save_tensors,
    table_files,
    write_json,
)

__all__ = [
    "CASCADE_DECISIONS", "CLASSIFIER_TEACHER_DATA", "DECISIONS", "DIFFUSION_TEACHER_DATA", "EXAMPLES", "ICD_BANK",
    "KIND_MODALITY", "LM_CASCADE_DECISIONS", "LM_SELECTION", "LM_TEACHER_DATA", "MANIFEST", "OPTIONAL", "SCHEMA_VERSION",
    "SELECTION", "TIMING", "Kind", "Output", "TableWriter", "artifact_hash", "check_schema", "code_version", "file_hash",
    "fingerprint", "inspect_table", "is_optional", "is_timing", "iter_batches", "join_timing", "list_column_to_numpy",
    "load_state", "load_tensors", "optional_field", "read_any_table", "read_manifest", "read_table", "save_state",
    "save_tensors", "split_timing", "table_files", "with_optional", "write_json", "write_manifest",
]  # fmt: skip
