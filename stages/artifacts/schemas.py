"""Every Parquet schema and manifest kind of distil, as code: the contract between stages.

A table is a directory of ``part-NNNNN.parquet`` files plus ``.manifest.json``; any
Parquet reader (``pyarrow.parquet.read_table(dir)``, DuckDB, polars,
``datasets.load_dataset("parquet")``) reads it without distil. The manifest's leading
underscore is what lets directory readers skip it, as they skip Spark's ``_SUCCESS``.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST = ".manifest.json"
"""Hidden, so every plain reader of the directory skips it: pyarrow and Spark skip "." and "_"
files, but ``datasets.load_dataset("parquet", data_dir=...)`` skips only hidden ones."""

# ---- schemas as code -------------------------------------------------------------------

OPTIONAL = b"distil.optional"
"""Field metadata key of a column added to a schema after files were written without it."""


def optional_field(name: str, type_: pa.DataType, why: str) -> pa.Field:
    """A nullable column that older files may lack: validation lets it be missing and
    ``with_optional`` reads it as nulls, so tables written before it existed stay valid."""
    return pa.field(name, type_, nullable=True, metadata={OPTIONAL: why.encode()})


def is_optional(field: pa.Field) -> bool:
    return field.metadata is not None and OPTIONAL in field.metadata


def with_optional(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with a null column for every optional field of ``schema`` it lacks."""
    for f in schema:
        if is_optional(f) and f.name not in table.schema.names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


EXAMPLES = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
    ]
)
"""Canonical classifier examples: one row per instance, features flattened."""

CLASSIFIER_TEACHER_DATA = EXAMPLES.append(pa.field("logits", pa.list_(pa.float32()), nullable=False))
"""Examples plus the teacher's full logits (classes are few, so no top-k)."""

SELECTION = CLASSIFIER_TEACHER_DATA.append(pa.field("weight", pa.float32(), nullable=False)).append(
    pa.field("reason", pa.string(), nullable=False)
)
"""Teacher data that survived a selection, with a training weight and why it was kept."""

CASCADE_DECISIONS = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("route", pa.string()),
        pa.field("confidence", pa.float32()),
        pa.field("answer", pa.int64()),
        pa.field("correct", pa.bool_()),
        pa.field("cost_flops", pa.float64()),
    ]
)
"""One row per query routed by a cascade. Wall-clock cost is no column (it differs between
reruns): ``seconds_per_1k_rows`` is in the manifest's ``timing.metrics``."""

LM_TEACHER_DATA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.int64(), nullable=False),
        pa.field("sample", pa.int32(), nullable=False),
        optional_field("teacher", pa.int32(), "index into the manifest's teachers; null (files before it) = 0"),
        pa.field("split", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("item", pa.int64()),
        pa.field("prompt", pa.string(), nullable=False),
        optional_field(
            "messages",
            pa.string(),
            "chat rows: the prompt conversation as JSON [{role, content}], no final assistant turn; null = text",
        ),
        pa.field("gold", pa.string()),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("parse", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("seq_logprob", pa.float32(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        optional_field("topk_logprobs", pa.list_(pa.float16()), "topk_format 1: the top-k log-probs; null in format 2"),
        optional_field(
            "topk_codes",
            pa.list_(pa.uint16()),
            "topk_format 2: per token round(-logprob / topk_step) of its best entry, then the increments down its "
            "top-k (a running total of 65535 is -inf); stages.lm.topk_codec",
        ),
        optional_field("topk_tail", pa.list_(pa.float32()), "topk_format 2: per token the mass outside the stored top-k"),
        optional_field("expert_ids", pa.list_(pa.uint8()), "MoE teachers: routed experts per generated token; empty/null = none"),
        optional_field("expert_weights", pa.list_(pa.float16()), "MoE teachers: router weights of expert_ids"),
        optional_field("finish_reason", pa.string(), "stop (end of sequence) or length (max_new_tokens); null in older files"),
        optional_field("prompt_tokens", pa.int32(), "the teacher's prompt tokens of this row's request (usage)"),
        optional_field("completion_tokens", pa.int32(), "the teacher's completion tokens of this row (usage)"),
    ]
)
"""LM teacher samples: per generated token the top-k teacher token ids and log-probs,
flattened row-major (``len(token_ids) * k`` values; k is in the manifest), never full
vocabularies. The manifest's ``topk_format`` says how (``stages.lm.topk_codec``, whose
``TopKFormat`` every reader decodes with): 1 (absent) = float16 ``topk_logprobs``; 2 = uint16
``topk_codes`` on a grid of ``topk_step`` nats plus ``topk_tail``, the mass outside the top-k. ``answer`` is null when none could be parsed, with ``parse`` saying why.
MoE teachers also store their routing per generated token (``stages.lm.moe.routing``: the input
position that predicted the token): ``expert_ids`` / ``expert_weights`` flattened token,
then layer, then rank (``len(token_ids) * layers * experts_per_token`` values, shape in the
manifest's ``routing``); empty for dense teachers, null in files written before them.
A teacher behind an API whose tokenizer is not the local one stores text only: empty
``token_ids`` and top-k, NaN ``seq_logprob`` when it returned no log-probs (the manifest's
``tokens`` says "text" and why).
A chat row's ``prompt`` is its conversation rendered with the teacher's chat template and
generation prompt, its ``messages`` that conversation (``stages.tasks.messages``)."""

LM_SELECTION = LM_TEACHER_DATA.append(pa.field("weight", pa.float32(), nullable=False)).append(
    pa.field("reason", pa.string(), nullable=False)
)
"""LM teacher samples kept by a selection, with a training weight and why."""

LM_CASCADE_DECISIONS = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("item", pa.int64()),
        pa.field("gold", pa.string()),
        pa.field("route", pa.string()),
        pa.field("answers", pa.list_(pa.string())),
        pa.field("agreement", pa.float32()),
        pa.field("samples_used", pa.int32()),
        pa.field("demos_used", pa.list_(pa.int64())),
        pa.field("student_prompt_tokens", pa.int64()),
        pa.field("student_completion_tokens", pa.int64()),
        pa.field("teacher_prompt_tokens", pa.int64()),
        pa.field("teacher_completion_tokens", pa.int64()),
        pa.field("voter_prompt_tokens", pa.int64()),
        pa.field("voter_completion_tokens", pa.int64()),
        pa.field("cost", pa.float64()),
        pa.field("student_answer", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("correct", pa.bool_()),
    ]
)
"""One row per test query routed by a language-model cascade: the student's sampled
answers (null where unparsable), its majority share (``agreement``), the bank ids of the
demonstrations in its prompt, tokens per model (``voter_*``: the extra weighted-vote
models), cost in the run's unit, and the final answer with its score (null without gold).
Wall-clock seconds are no column (they differ between reruns): metrics.json has their sum."""

ICD_BANK = pa.schema(
    [
        pa.field("bank_id", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)
"""The demonstration bank of an LM cascade: ``text`` is what goes into a student prompt;
``source`` is ``teacher_data`` or ``online`` (a deferred query the teacher answered)."""

DIFFUSION_TEACHER_DATA = pa.schema(
    [
        pa.field("sample", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("timestep", pa.int32(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
    ]
)
"""Index of a generator's trajectories: one row per stored state. The states themselves
are in ``_states/shard-NNNNN.safetensors`` (tensor ``states`` [rows, *sample_shape],
float32), row ``offset`` of shard ``shard``; part ``part-NNNNN.parquet`` indexes shard
NNNNN (Parquet directory readers skip ``_``-prefixed entries, as the manifest). ``seed``
seeded the sample's noise; ``step`` 0 is that noise, ``timestep`` the teacher timestep of
the state (-1: the final sample, step = the number of steps)."""

DECISIONS = "decisions"
"""A cascade's output keeps its decisions table in this subdirectory, beside its JSON and
CSV files, so plain Parquet readers open ``<cascade>/decisions`` directly."""


class Kind:
    """Every manifest ``kind`` a stage writes: one name each, read by ``stages.modality``."""

    TEACHER_DATA = "teacher_data"  # classifier logits
    EXAMPLES = "examples"  # classifier rows of features and labels (dataset-distill's synthetic set)
    SELECTION = "selection"
    MODEL = "model"
    CASCADE_DECISIONS = "cascade_decisions"
    EVALUATION = "evaluation"
    LM_TEACHER_DATA = "lm_teacher_data"
    LM_SELECTION = "lm_selection"
    LM_PROMPTS = "lm_prompts"
    LM_MODEL = "lm"
    LM_CASCADE_DECISIONS = "lm_cascade_decisions"
    LM_CASCADE = "lm_cascade"
    ICD_BANK = "icd_bank"
    DIFFUSION_TEACHER_DATA = "diffusion_teacher_data"
    GENERATOR = "generator"
    GENERATOR_EVALUATION = "generator_evaluation"


KIND_MODALITY = {
    Kind.TEACHER_DATA: "classifier", Kind.EXAMPLES: "classifier", Kind.SELECTION: "classifier", Kind.MODEL: "classifier",
    Kind.CASCADE_DECISIONS: "classifier", Kind.EVALUATION: "classifier",
    Kind.LM_TEACHER_DATA: "lm", Kind.LM_SELECTION: "lm", Kind.LM_PROMPTS: "lm", Kind.LM_MODEL: "lm",
    Kind.LM_CASCADE_DECISIONS: "lm", Kind.LM_CASCADE: "lm", Kind.ICD_BANK: "lm",
    Kind.DIFFUSION_TEACHER_DATA: "diffusion", Kind.GENERATOR: "diffusion", Kind.GENERATOR_EVALUATION: "diffusion",
}  # fmt: skip
"""The modality each kind belongs to (``evaluation`` is written by classifier and LM runs alike;
it is nobody's input)."""
