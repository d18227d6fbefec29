"""Several LM teachers side by side: one vocabulary for all of them (so their stored top-k
token ids mean the same tokens) and the tasks each was trained on (for mst's task gate).
"""

from __future__ import annotations

from pathlib import Path

from stages.errors import DistilError


def same_vocabulary(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def check_shared_tokenizer(paths: list[Path], tokenizers: list) -> None:
    """Top-k token ids of several teachers are only comparable on one vocabulary."""
    for path, tok in zip(paths[1:], tokenizers[1:], strict=True):
        if not same_vocabulary(tokenizers[0], tok):
            raise DistilError(
                f"teachers {paths[0]} ({len(tokenizers[0])} tokens) and {path} ({len(tok)} tokens) use different tokenizers, "
                "so their top-k token ids are not comparable; build them with one tokenizer (--set lm.tokenizer=DIR) or set top_k=0"
            )


def describe_teachers(paths: list[Path], top_k: int) -> list[dict]:
    """One manifest entry per teacher (path, content hash, vocabulary size, training tasks),
    after checking that they share a tokenizer when top-k token ids are stored."""
    from stages.lm.models import lm_identity, load_tokenizer

    tokenizers = [load_tokenizer(p) for p in paths]
    if top_k > 0:
        check_shared_tokenizer(paths, tokenizers)
    return [
        {**lm_identity(p), "vocab_size": len(tok), "tasks": training_tasks(p)} for p, tok in zip(paths, tokenizers, strict=True)
    ]


def shared_tokenizer(name: str):
    """The tokenizer ``lm.tokenizer`` names: a model or tokenizer directory, or a shipped model."""
    from stages.lm.models import SHIPPED, load_tokenizer

    if name not in SHIPPED and not Path(name).exists() and "/" not in name:
        raise DistilError(f"lm.tokenizer '{name}' is neither a directory nor a shipped model ({', '.join(SHIPPED)})")
    if Path(name).is_dir() and not any(Path(name).glob("tokenizer*.json")):
        raise DistilError(f"lm.tokenizer {name} holds no tokenizer (tokenizer.json); point at a model or tokenizer directory")
    return load_tokenizer(name)


def training_tasks(path: str | Path, depth: int = 0) -> list[str]:
    """The task names a distil LM was trained on, from its manifest: a reasoning task or the
    tasks of a mixture; for teacher data or a selection, the tasks its prompts came from; for
    a prompt table, the name its rows carry in ``task`` (the file's stem). [] when unknown
    (a shipped or hub model has no manifest)."""
    from stages.artifacts import read_manifest
    from stages.tasks.mixture import task_names

    manifest = read_manifest(Path(path)) if Path(path).is_dir() else {}
    name = str(manifest.get("task", {}).get("name", ""))
    if not name:
        return []
    names = task_names(name)
    if names:
        return list(names)
    if name.startswith("hf:"):
        return [Path(name[3:]).name]
    if Path(name).is_dir() and depth < 5:  # trained on teacher data, a selection or a prompt table: its source's tasks
        inner = training_tasks(name, depth + 1)
        if inner:
            return inner
    return [Path(name).stem]


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer's ids: the sha256 of its token -> id table, its size and
    end-of-sequence id. ``distil serve`` advertises it in ``/v1/models``; the HTTP teacher
    compares it with its local tokenizer before it trusts the server's token ids."""
    import hashlib
    import json

    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()).hexdigest()
    return {"sha256": digest, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
