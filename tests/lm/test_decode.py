"""The lean sampling loop of in-training completions (``stages.lm.decode``)."""

from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from stages.lm.decode import gumbel_max, sample_tokens
from stages.lm.generation import sample_continuations
from stages.lm.models import DENSE, LMSize, build_lm, train_tokenizer

TEXTS = [f"Question: {a} + {b} =\nAnswer: {a + b}" for a in range(30) for b in range(10)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_gumbel_max_draws_from_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).expand(40_000, 5)
    torch.manual_seed(0)
    for temperature in (1.0, 0.5):
        freq = torch.bincount(gumbel_max(logits, temperature), minlength=5) / 40_000
        want = torch.softmax(logits[0] / temperature, -1)
        assert float((freq - want).abs().max()) < 0.01 and freq[4] == 0  # 4 sigma at n = 40k; -inf never drawn


def _left(prompts, pad):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def _without_cache(model, prompts, n, temperature):
    """The reference: every step a full forward of each row's unpadded prefix, the same multinomial draws."""
    seqs, out = [list(p) for p in prompts], []
    for _ in range(n):
        logits = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1] for s in seqs]).float()
        token = gumbel_max(logits, temperature)
        out.append(token)
        for s, t in zip(seqs, token.tolist(), strict=True):
            s.append(t)
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", DENSE)
def test_cached_left_padded_sampling_draws_what_full_forwards_of_each_prompt_give(tok, family):
    model = build_lm(family, LMSize(hidden=32, layers=2, heads=4, context=64), tok).double().eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Question: 3 + 4 =", "Question: 12 + 9 =\nAnswer:", "Q")]
    ids, mask = _left(prompts, tok.pad_token_id)
    torch.manual_seed(5)
    got = sample_tokens(model, ids, mask, max_new_tokens=8, pad_token_id=tok.pad_token_id, eos_token_id=None, temperature=0.7)
    torch.manual_seed(5)
    want = _without_cache(model, prompts, 8, 0.7)
    assert got.shape == (3, 8) and torch.equal(got, want)  # positions, padding and cache are all right


def test_prefill_projects_the_last_position_only(tok):
    model = build_lm("llama", LMSize(hidden=32, layers=1, heads=4, context=64), tok).eval()
    widths = []
    model.lm_head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    ids, mask = _left([list(range(5, 25)), list(range(5, 15))], tok.pad_token_id)
    sample_tokens(model, ids, mask, max_new_tokens=3, pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert widths == [1, 1, 1]  # never [prompt, V] logits


class _Scripted(torch.nn.Module):
    """A causal LM that emits token ``script[row][step]`` with certainty (a stand-in with the forward of one)."""

    def __init__(self, script, vocab=10):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0):
        step, self.calls = self.calls, self.calls + 1
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e9)
        for r, row in enumerate(self.script):
            logits[r, 0, row[min(step, len(row) - 1)]] = 0.0
        return CausalLMOutputWithPast(logits=logits, past_key_values=("cache", step))


def test_rows_after_eos_are_padded_and_sampling_stops_once_all_are_done():
    eos, pad = 2, 0
    model = _Scripted([[5, 2, 7, 7, 7], [6, 6, 6, 2, 7]])
    ids, mask = torch.tensor([[4, 4], [0, 4]]), torch.tensor([[1, 1], [0, 1]])
    got = sample_tokens(model, ids, mask, max_new_tokens=10, pad_token_id=pad, eos_token_id=eos)
    assert got.tolist() == [[5, 2, 0, 0], [6, 6, 6, 2]] and model.calls == 4


def test_continuations_hand_the_model_back_in_its_mode_and_cut_after_eos():
    model = _Scripted([[5, 2, 7], [6, 6, 6]]).train()
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    assert sample_continuations(model, tok, [[4, 4], [4]], max_new_tokens=3, max_len=64, device="cpu") == [[5, 2], [6, 6, 6]]
    assert model.training
    model = _Scripted([[5, 2, 7], [6, 6, 6]])
    assert sample_continuations(model, tok, [[4, 4], [4]], max_new_tokens=3, max_len=4, device="cpu") == [[5, 2], [6, 6]]


def test_a_peft_student_samples_through_its_adapter(tok):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_lm("llama", LMSize(hidden=32, layers=1, heads=4, context=64), tok),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()  # fmt: skip
    ids, mask = _left([list(range(5, 12))], tok.pad_token_id)
    assert sample_tokens(model, ids, mask, max_new_tokens=4, pad_token_id=tok.pad_token_id, eos_token_id=None).shape == (1, 4)
