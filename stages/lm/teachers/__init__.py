"""LM teachers: one ``Teacher`` protocol (``base``) and its backends: in-process
transformers (``transformers_backend``), a vLLM engine (``vllm_backend``) and any
OpenAI-compatible server (``http``). ``open_teacher`` picks the backend from the spec and
``teacher.backend`` (a name of ``teacher.endpoints`` stands for its URL and model);
callers never name a backend themselves. ``vocabulary`` checks that
several teachers share one tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stages.errors import DistilError
from stages.lm.teachers.base import Completion, Sampling, Scored, Teacher
from stages.modality import is_url

__all__ = ["Completion", "Sampling", "Scored", "Teacher", "backend_of", "is_url", "open_teacher", "resolve"]


def resolve(spec: str | Path, cfg):
    """(spec, cfg) with a named endpoint of ``cfg.endpoints`` replaced by its URL and model."""
    named = cfg.endpoints.get(str(spec)) if cfg.endpoints else None
    if named is None:
        return spec, cfg
    if not isinstance(named, dict) or not is_url(named.get("url", "")) or set(named) - {"url", "model"}:
        raise DistilError(f"teacher.endpoints.{spec} must be {{url: http://HOST:PORT/v1, model: NAME}}, got {named!r}")
    return named["url"], dataclasses.replace(cfg, model=named.get("model", cfg.model))


def backend_of(spec: str | Path, backend: str) -> str:
    """The backend a teacher spec runs on: ``backend`` unless it is auto."""
    if backend == "auto":
        return "http" if is_url(spec) else "transformers"
    if (backend == "http") != is_url(spec):
        want = "an http(s):// URL" if backend == "http" else "a model directory or name"
        raise DistilError(f"teacher.backend={backend} needs {want}, got '{spec}'; set teacher.backend=auto")
    return backend


def open_teacher(spec: str | Path, cfg, device, **local) -> Teacher:
    """The ``Teacher`` for ``spec`` (a model directory or name, or a server URL) under the
    ``TeacherConfig`` ``cfg``; ``local`` (decode, routing, model, tokenizer) reach the
    transformers backend only."""
    spec, cfg = resolve(spec, cfg)
    backend = backend_of(spec, cfg.backend)
    if backend == "http":
        from stages.lm.teachers.http import HTTPTeacher

        return HTTPTeacher(str(spec), cfg)
    if backend == "vllm":
        from stages.lm.teachers.vllm_backend import VLLMTeacher

        return VLLMTeacher(str(spec), cfg)
    from stages.lm.teachers.transformers_backend import TransformersTeacher

    return TransformersTeacher(spec, device, **local)
