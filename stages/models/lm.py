"""Language models: built from a config (GPT-2, Llama and Qwen2 families, sizes as
knobs) with a small BPE tokenizer trained on the task text, or loaded from a directory or
a hub name (online users). Everything is written with ``save_pretrained``, so plain
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``
load it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.errors import DistilError

FAMILIES = ("gpt2", "llama", "qwen2")
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


@dataclass(frozen=True)
class LMSize:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 0
    """0 = as many key/value heads as query heads (no grouped-query attention)."""
    intermediate: int = 0
    """0 = 4 x hidden."""
    context: int = 256


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: Path | None = None):
    """A byte-level BPE tokenizer trained with the ``tokenizers`` library on ``texts``,
    wrapped as a ``PreTrainedTokenizerFast`` (saved to ``out`` when given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise DistilError(f"tokenizer vocab_size must be >= 300 (256 bytes + merges + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"],
    )  # fmt: skip
    if out is not None:
        fast.save_pretrained(out)
    return fast


def lm_config(family: str, size: LMSize, tokenizer):
    """A transformers config of ``family`` sized by ``size`` for ``tokenizer``'s vocabulary."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family not in FAMILIES:
        raise DistilError(f"unknown LM family '{family}'; choose one of {', '.join(FAMILIES)}")
    if size.hidden % size.heads:
        raise DistilError(f"hidden size {size.hidden} is not divisible by {size.heads} heads")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vocab = len(tokenizer)
    inter = size.intermediate or 4 * size.hidden
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=size.hidden, n_layer=size.layers, n_head=size.heads, n_inner=inter,
                          n_positions=size.context, **ids)  # fmt: skip
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(
        vocab_size=vocab, hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads or size.heads, intermediate_size=inter, max_position_embeddings=size.context,
        tie_word_embeddings=True, **ids,
    )  # fmt: skip


def build_lm(family: str, size: LMSize, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(lm_config(family, size, tokenizer))


def load_lm(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local directory or, for online users, a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars, not one per weight file
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir() or not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise DistilError(f"{path} holds no model weights (*.safetensors); point at a directory written by save_pretrained")
        if not (path / "config.json").exists():
            raise DistilError(f"{path} has no config.json; it is not a transformers model directory")
    elif "/" not in str(name_or_path):
        raise DistilError(f"model '{name_or_path}' is neither a directory nor a hub name (org/name); check the path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    except OSError as exc:
        raise DistilError(
            f"cannot load {name_or_path} ({str(exc).splitlines()[0][:160]}); offline runs need a local directory"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def check_same_tokenizer(teacher_tok, student_tok, method: str) -> None:
    """Token-level losses compare distributions over one vocabulary: refuse otherwise."""
    if len(teacher_tok) != len(student_tok) or teacher_tok.get_vocab() != student_tok.get_vocab():
        raise DistilError(
            f"method '{method}' compares token distributions, but the teacher's tokenizer has {len(teacher_tok)} tokens "
            f"and the student's {len(student_tok)} (or they differ); use one tokenizer for both, or --method sft"
        )
