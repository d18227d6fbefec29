"""One dataclass per stage, mirroring its section of params.yaml.

Every field has a default and a one-line help (its ``metadata["help"]``). Unknown keys
raise, so a typo in params.yaml or ``--set`` is an error rather than a silent default.
A numeric field may declare its valid values (``metadata["valid"]``, a ``Range``);
``from_dict``, which every params section and ``--set`` value goes through, refuses a
value outside it with one line naming the key, the value and the range.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from stages.errors import DistilError

T = TypeVar("T")


CLASSIFIER, LM, DIFFUSION = "classifier", "lm", "diffusion"
EVERY = (CLASSIFIER, LM, DIFFUSION)
MODALITY_NAMES = {CLASSIFIER: "classifier", LM: "language-model", DIFFUSION: "diffusion"}


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting (each item, for a list): a low and/or a high
    bound, each closed or open, and sentinel values outside them that mean something
    (``also=(-1,)``: -1 = calibrate; ``also=(0,)``: 0 = off)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()

    def __contains__(self, value: float) -> bool:
        if value in self.also:
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below  # NaN fails both comparisons: refused

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        return text + "".join(f" or {v:g}" for v in self.also)


COUNT = Range(1)
NONNEG = Range(0)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1)
SHARE = Range(0, 1, low_open=True)
DECAY = Range(0, 1, high_open=True)
"""The common ranges: counts >= 1, >= 0 (where 0 = off / all / none), > 0, weights and
shares in [0, 1], shares in (0, 1], EMA decays and split fractions in [0, 1)."""
SPLITS = ("train", "dev", "test")
"""The splits every table is cut into (the choices of the split settings)."""


def _f(default: Any, help: str, only: tuple[str, ...] = EVERY, valid: Range | None = None, choices: tuple = ()) -> Any:
    """A field with its default, its one-line help, the modalities that read it and, for a
    number (or a list of numbers), the range of its valid values; for a word (or a list of
    words) of a fixed set, its ``choices``."""
    meta = {"help": help, "only": only, "valid": valid, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """How raw examples are read and split; shared by every stage that reads raw data."""

    features: list[str] = _f(
        [], "feature columns of a user table (several numeric columns or one list column); [] = all but label/split/id"
    )
    label: str = _f("label", "label column of a user table")
    split_column: str = _f("", "column holding train/dev/test; '' = make a stratified split")
    split_seed: int = _f(0, "seed of the stratified train/dev/test split (fixed across stages)", valid=NONNEG)
    dev_frac: float = _f(0.15, "share of rows in the dev split", valid=DECAY)
    test_frac: float = _f(0.2, "share of rows in the test split", valid=DECAY)
    limit: int = _f(0, "keep at most this many rows per split (0 = all); for quick runs and tests", valid=NONNEG)
    standardize: bool = _f(True, "classifiers on flat features (user tables): z-score by train-split stats saved in the model")
    sizes: list[int] = _f(
        [2000, 200, 200],
        "reasoning tasks and 2-D toy distributions (moons, ...): items in the train, dev and test splits",
        valid=NONNEG,
    )
    unlabeled: int = _f(
        0,
        "reasoning tasks: extra train prompts with the gold answer withheld (a transfer set only a teacher labels)",
        valid=NONNEG,
    )
    task_options: dict = _f(
        {},
        "reasoning tasks: options of the reasoning-gym generator (e.g. {max_terms: 3, max_digits: 1}); "
        "for a mixture (chain_sum+basic_arithmetic) keyed by task: {chain_sum: {...}, basic_arithmetic: {...}}",
    )
    chat: bool = _f(
        False, "reasoning tasks: also give each prompt as a conversation (messages: one user turn), read through a chat model's template"
    )
    system: str = _f("", "reasoning tasks with chat: a system message before each question ('' = none)")
    prompt_column: str = _f("prompt", "LM prompt tables: the prompt column")
    answer_column: str = _f("answer", "LM prompt tables: the gold answer column (optional in the table)")
    long_tail: float = _f(
        0.0,
        "imbalance ratio of an exponential long-tailed profile applied to the train split (0 = off; e.g. 50)",
        valid=Range(1, also=(0,)),
    )
    image_size: int = _f(8, "digits-images: image side, 8 (native) or 16 (bilinear upsampling)")
    domains: list[str] = _f(
        [], "digits: one copy of the task per domain transformation (none, rot90, rot180, rot270, flip, transpose, invert, "
        "shift, noise); a row's domain is id // 1,000,000; [] = the plain digits"
    )
    target: str = _f(
        "answer",
        "reasoning tasks, gold rows: what a student trained on them writes: answer, cot (the running sums, step by step) or "
        "agent (a code-tool trajectory: thought, code, observation, answer); cot and agent need arithmetic questions",
        choices=("answer", "cot", "agent"),
    )


@dataclass
class ModelConfig:
    """A small built-in classifier network."""

    arch: str = _f("mlp", "mlp or cnn")
    width: int = _f(64, "hidden units (mlp) or channels of the first conv (cnn)", valid=COUNT)
    depth: int = _f(1, "hidden layers (mlp) or conv blocks (cnn)", valid=NONNEG)
    dropout: float = _f(0.0, "dropout before the output layer", valid=DECAY)
    experts: int = _f(1, "output heads on the shared trunk (mdcs: E >= 2 experts; prediction = their mean)", valid=COUNT)


@dataclass
class LMConfig:
    """A language-model student or teacher (used when the data is a reasoning task or a prompt table)."""

    family: str = _f(
        "llama", "gpt2, llama, qwen2, or the MoE families mixtral, qwen2_moe, olmoe (built from this config unless `init` is set)"
    )
    hidden: int = _f(64, "hidden size", valid=COUNT)
    layers: int = _f(2, "transformer layers", valid=COUNT)
    heads: int = _f(4, "attention heads", valid=COUNT)
    kv_heads: int = _f(0, "key/value heads (0 = heads)", valid=NONNEG)
    intermediate: int = _f(0, "MLP width (0 = 4 x hidden); for MoE families the width of each expert", valid=NONNEG)
    experts: int = _f(4, "MoE families: routed experts per layer", valid=COUNT)
    experts_per_token: int = _f(2, "MoE families: experts each token is routed to (router top-k)", valid=COUNT)
    router_aux_loss: float = _f(0.01, "MoE families: weight of the router load-balancing loss in training", valid=NONNEG)
    context: int = _f(128, "maximum sequence length in tokens (prompt + completion)", valid=COUNT)
    vocab_size: int = _f(512, "BPE vocabulary trained on the task text when building from a config", valid=COUNT)
    tokenizer: str = _f(
        "", "building from a config: reuse the tokenizer of this model/tokenizer directory (or shipped name) instead of "
        "training a BPE; specialist teachers and their student share one vocabulary this way (mst)",
    )  # fmt: skip
    init: str = _f("", "start from this model directory or hub name instead of a config")
    keep_layers: list[int] = _f(
        [], "a student from init: keep only these decoder layers, by index (depth pruning before distilling; [] = all)",
        valid=NONNEG,
    )  # fmt: skip
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), fp32 or bf16")
    max_new_tokens: int = _f(16, "on-policy: length of the completions the student samples", valid=COUNT)
    chat_template: str = _f(
        "", "chat data: a Jinja chat template that replaces the model's own ('' = the tokenizer's, else the plain format)"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (long sequences, less memory)")
    loss_chunk: int = _f(
        256, "token positions per chunk of the fused student loss (output layer, log-softmax, CE and divergence and their "
        "gradients on completion tokens a chunk at a time: the [tokens, vocab] logits never exist whole); 0 = unfused",
        valid=NONNEG,
    )  # fmt: skip


@dataclass
class LoraConfig:
    """A LoRA adapter on the student (``peft``): ``r`` 0 trains every weight."""

    r: int = _f(0, "adapter rank (0 = no LoRA: train every weight)", only=(LM,), valid=NONNEG)
    alpha: float = _f(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)", only=(LM,), valid=POSITIVE)
    dropout: float = _f(0.0, "dropout on the adapter's input", only=(LM,), valid=Range(0, 1, high_open=True))
    target_modules: list[str] = _f(
        [], "module names to adapt ([] = peft's default for the model family, e.g. q_proj and v_proj)", only=(LM,)
    )
    merge: bool = _f(False, "also write merged weights that plain transformers loads (besides the adapter)", only=(LM,))


@dataclass
class RewardConfig:
    """Reward-aware LM methods (``grpo``, ``rlad``): rollouts scored by the task's verifier."""

    group_size: int = _f(4, "completions sampled per prompt; advantages are relative to the group (>= 2)", only=(LM,), valid=Range(2))
    clip: float = _f(0.2, "trust region: ratios are clipped to [1 - clip, 1 + clip]", only=(LM,), valid=Range(0, 1, low_open=True, high_open=True))
    kl: float = _f(0.0, "grpo: weight of the KL to the starting student (k3 estimator; 0 = none, as DAPO / Dr. GRPO)", only=(LM,), valid=NONNEG)
    feedback: str = _f(
        "{prompt}\nCorrect solution:\n{solution}\nCorrectly solve the original question.\n{prompt}",
        "srpo, sdpo: the self-teacher's prompt, a correct sibling's answer ({solution}) shown with the question ({prompt})",
        only=(LM,),
    )
    revise: str = _f(
        "{prompt} {response}\n{verdict}\n{prompt}",
        "sd-zero: the reviser's prompt, the question ({prompt}), an answer ({response}) and its verdict phrase ({verdict})",
        only=(LM,),
    )
    srt_prompts: int = _f(256, "sd-zero: train questions of the self-revision phase", only=(LM,), valid=COUNT)
    revisions: int = _f(3, "sd-zero: revisions sampled per answer in the self-revision phase", only=(LM,), valid=COUNT)
    srt_epochs: int = _f(1, "sd-zero: passes over the kept revisions before self-distillation", only=(LM,), valid=COUNT)
    teacher_mix: float = _f(
        0.5, "rlad: teacher weight w of the ratio's anchor pi_old^(1-w) pi_teacher^w (TRRD's alpha = 1 - w; 0 = grpo)",
        only=(LM,), valid=UNIT,
    )  # fmt: skip


@dataclass
class QCRDConfig:
    """``qcrd``: contrastive rationale distillation (``stages.lm.methods.qcrd``)."""

    lag: int = _f(50, "negatives come from the student lag to 2 x lag optimiser steps old", only=(LM,), valid=COUNT)
    temperature: float = _f(1.5, "sampling temperature of the negatives", only=(LM,), valid=POSITIVE)
    margin: float = _f(3.0, "delta: a negative is pushed down until its CE per token reaches delta", only=(LM,), valid=POSITIVE)
    weight: float = _f(0.2, "beta: weight of the negatives' margin term", only=(LM,), valid=NONNEG)


@dataclass
class AgentConfig:
    """Agent mode for LMs (``stages.lm.agent``): the model thinks, writes ``Code:`` lines that a
    sandboxed Python tool runs, reads the observation and answers."""

    tool: str = _f("none", "none (plain completions) or python (the sandboxed code tool)", only=(LM,), choices=("none", "python"))
    max_calls: int = _f(2, "tool calls per trajectory before the model is asked for its answer", only=(LM,), valid=COUNT)
    samples: int = _f(
        1, "self-consistent actions: code candidates sampled per call, the observation most agree on kept (1 = one)",
        only=(LM,), valid=COUNT,
    )  # fmt: skip
    temperature: float = _f(0.7, "temperature of those candidates (samples > 1)", only=(LM,), valid=POSITIVE)
    round_tokens: int = _f(64, "new tokens per round (a thought and a code line, up to its observation)", only=(LM,), valid=COUNT)
    first_thought: bool = _f(
        False, "start each trajectory with the model's own first thought, written before it sees the tool format", only=(LM,)
    )
    seconds: float = _f(2.0, "the sandbox's time limit per call (wall clock and CPU)", only=(LM,), valid=POSITIVE)
    memory_mb: int = _f(256, "the sandbox's memory limit per call", only=(LM,), valid=Range(16))


@dataclass
class DiffusionConfig:
    """A diffusion teacher or consistency student (used when the data is a generator dataset: moons, digits-images, ...)."""

    arch: str = _f("auto", "auto (mlp for 2-D points, unet for images), mlp or unet")
    width: int = _f(128, "mlp: hidden units", valid=COUNT)
    depth: int = _f(3, "mlp: residual hidden blocks", valid=NONNEG)
    time_dim: int = _f(64, "mlp: size of the sinusoidal time embedding", valid=Range(2))
    channels: list[int] = _f([32, 64], "unet: channels of each resolution level (one down and one up block each)", valid=COUNT)
    layers_per_block: int = _f(1, "unet: resnet layers per block", valid=COUNT)
    norm_groups: int = _f(8, "unet: GroupNorm groups (must divide every channel count)", valid=COUNT)
    prediction: str = _f("v_prediction", "denoise: what the network predicts: epsilon, v_prediction or sample")
    classes: int = _f(
        0,
        "denoise: a class-conditional teacher over this many classes of labelled data (digits-images: 10), trained with "
        "label dropout for classifier-free guidance (0 = unconditional)",
        valid=NONNEG,
    )
    diversity: float = _f(
        0.0,
        "cfg-distill: weight of the diversity term, the cosine similarity of two one-step predictions of the same class and "
        "weight from different noise (0 = off)",
        valid=NONNEG,
    )
    guidance_weights: list[float] = _f(
        [0.0, 1.0, 2.0, 3.0, 4.0],
        "cfg-distill: the guidance weights w the student learns, each its own condition (evaluate.guidance picks among them)",
        valid=NONNEG,
    )
    label_dropout: float = _f(
        0.1, "denoise with classes: share of train rows given the null class, so the model also learns the unconditional score",
        valid=DECAY,
    )
    beta_schedule: str = _f(
        "cosine",
        "denoise: betas of the DDPMScheduler: cosine (squaredcos_cap_v2; pair with v_prediction), linear or scaled_linear",
    )
    train_timesteps: int = _f(1000, "denoise: diffusion steps T of the noise schedule", valid=Range(2))
    ema: float = _f(
        0.999,
        "denoise, consistency-train, progressive: EMA decay of the saved weights (warm-up min(ema, (1+n)/(10+n)) over steps n)",
        valid=DECAY,
    )
    solver: str = _f(
        "ddim", "consistency-distill, multistep: teacher ODE solver of the step from t_{n+k} to t_n: ddim, euler or heun"
    )
    skip: int = _f(
        20,
        "consistency-distill, multistep: k, the timesteps one solver step skips (grid of T/k points; LCM: 20 of 1000)",
        valid=COUNT,
    )
    target_ema: float = _f(
        0.95, "consistency-distill, multistep, trajectory: EMA decay mu of the target network theta^- (LCM: 0.95)", valid=DECAY
    )
    sample_ema: float = _f(
        0.0,
        "consistency-distill, multistep, trajectory: EMA decay (with warm-up) of the online student kept for sampling "
        "and saved; 0 saves the target theta^- (LCM)",
        valid=DECAY,
    )
    loss: str = _f(
        "l2", "consistency-distill, multistep, trajectory: distance d: l2 or huber (pseudo-Huber sqrt(|a-b|^2 + c^2) - c)"
    )
    huber_c: float = _f(
        0.0,
        "pseudo-Huber c (loss huber; consistency-train always); 0 = 0.00054 * sqrt(dim) (iCT; x data_std/0.5 in consistency-train)",
        valid=NONNEG,
    )
    timestep_scaling: float = _f(
        10.0, "consistency-distill, trajectory: LCM's timestep scaling s of the boundary scalings c_skip, c_out", valid=POSITIVE
    )
    student_init: str = _f(
        "teacher",
        "consistency-distill, multistep, trajectory: teacher (start from its weights, standard) or fresh (build from this section)",
    )
    eval_samples: int = _f(
        512, "students of a teacher: fixed noise batch of the per-epoch paired error to the teacher", valid=COUNT
    )
    eval_steps: int = _f(50, "students of a teacher: teacher ODE steps of the paired-error reference", valid=COUNT)
    students: int = _f(
        2, "multi-student: one-step students, each for a contiguous group of the teacher's classes", valid=Range(2)
    )
    noise_strength: float = _f(
        0.3, "scott: noise strength eta of the teacher's stochastic step, 0 (the ODE's DDIM step) to 1 (ancestral)",
        valid=Range(0, 1),
    )
    dmd_pairs: int = _f(
        1024, "dmd: noise / teacher-ODE-solution pairs of the regression term (the teacher's eval_steps DDIM steps)", valid=COUNT
    )
    dmd_regression: float = _f(0.25, "dmd: weight of the regression term (DMD's lambda_reg)", valid=NONNEG)
    dmd_fake_steps: int = _f(
        1, "dmd / phased-dmd: updates of the fake score per generator step (DMD2's two time-scale rule uses 5; 3 on digits: "
        "phased-dmd's FD halves on every seed, dmd's changes within noise; about 1.8x the time)", valid=COUNT
    )
    phases: int = _f(
        2, "phased-dmd: K phases of the SNR range, one expert each, sampled in K steps (K must divide the teacher's timesteps)",
        valid=COUNT,
    )
    flow_diagonal: float = _f(
        0.75, "flow-map: share of each batch on the diagonal s = t (flow matching of the velocity); the rest trains the "
        "Lagrangian self-distillation of the map", valid=Range(0, 1, high_open=True),
    )
    control_class: int = _f(0, "control-lora: the class whose train images the adapter learns to generate", valid=NONNEG)
    control_rank: int = _f(4, "control-lora: rank r of the LoRA adapter on the generator's linear and conv layers", valid=COUNT)
    segments: int = _f(
        4,
        "multistep: s, segments of the time axis; consistency within each, sampled in s DDIM steps along their starts",
        valid=COUNT,
    )
    teacher_steps: int = _f(
        64, "progressive: N, the DDIM steps of the first round's teacher; every round halves them", valid=COUNT
    )
    target_steps: int = _f(
        4, "progressive: DDIM steps of the final student; teacher_steps / target_steps must be a power of two", valid=COUNT
    )
    sigma_min: float = _f(
        0.002, "consistency-train: Karras sigma_min for data of std 0.5 (iCT), scaled by data_std / 0.5", valid=POSITIVE
    )
    sigma_max: float = _f(
        80.0, "consistency-train: Karras sigma_max for data of std 0.5 (iCT), scaled by data_std / 0.5", valid=POSITIVE
    )
    rho: float = _f(7.0, "consistency-train: Karras rho of the noise levels", valid=POSITIVE)
    p_mean: float = _f(-1.1, "consistency-train: mean of the lognormal over ln sigma (iCT), shifted by ln(data_std / 0.5)")
    p_std: float = _f(2.0, "consistency-train: std of the lognormal over ln sigma (iCT)", valid=POSITIVE)
    curriculum: list[int] = _f(
        [10, 1280],
        "consistency-train: s0, s1: noise levels N(k) = min(s0 2^floor(k/K'), s1) + 1 double over training",
        valid=COUNT,
    )
    data_std: float = _f(
        0.0,
        "consistency-train: the data's std, scaling iCT's constants (set for std 0.5); 0 = the train split's std",
        valid=NONNEG,
    )
    checkpoint_every: int = _f(10, "epochs between resumable checkpoints (a killed run resumes at the last one)", valid=COUNT)


@dataclass
class TeacherConfig:
    """Where an LM teacher runs (``stages.lm.teachers``): in process (transformers), in a
    vLLM engine, or behind an OpenAI-compatible server (``--teacher http://HOST:PORT/v1``)."""

    backend: str = _f(
        "auto", "auto (http for a URL, else transformers), transformers, vllm or http", choices=("auto", "transformers", "vllm", "http"), only=(LM,)
    )
    model: str = _f("", "http: the served model's name ('' = the server's only model, from /v1/models)", only=(LM,))
    api: str = _f("completions", "http: generate through /v1/completions or /v1/chat/completions", choices=("completions", "chat"), only=(LM,))
    api_key_env: str = _f("OPENAI_API_KEY", "http: the environment variable holding the API key (never written anywhere)", only=(LM,))
    concurrency: int = _f(8, "http: requests in flight at once", valid=COUNT, only=(LM,))
    timeout: float = _f(60.0, "http: seconds one request may take", valid=POSITIVE, only=(LM,))
    retries: int = _f(5, "http: retries of a request on 429, 5xx and connection errors (exponential backoff with jitter)", valid=NONNEG, only=(LM,))
    backoff: float = _f(0.5, "http: seconds before the first retry; doubled each retry, Retry-After honoured", valid=NONNEG, only=(LM,))
    token_ids: bool = _f(True, "http: ask for token ids (vLLM's and distil serve's return_tokens_as_token_ids); false for servers that refuse unknown fields", only=(LM,))
    tokenizer: str = _f("", "http: a local model or tokenizer dir whose ids the server's tokens map to (checked); '' = text only", only=(LM,))
    top_k: int = _f(20, "served teachers: top log-probs per token that on-policy scoring asks for", valid=COUNT, only=(LM,))
    endpoints: dict = _f({}, "named servers, {NAME: {url: http://HOST:PORT/v1, model: NAME}}: --teacher NAME picks one", only=(LM,))
    vllm_args: dict = _f({}, "vllm: keyword arguments of vllm.LLM (dtype, gpu_memory_utilization, max_model_len, ...)", only=(LM,))


@dataclass
class DistillConfig:
    method: str = _f("kd", "training method: see `distil distill --help`")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"only": (CLASSIFIER,), "help": "student architecture"})
    lm: LMConfig = field(
        default_factory=LMConfig, metadata={"only": (LM,), "help": "language-model student (reasoning tasks, prompt tables)"}
    )
    diffusion: DiffusionConfig = field(
        default_factory=DiffusionConfig,
        metadata={"only": (DIFFUSION,), "help": "diffusion teacher / consistency student (generator data)"},
    )
    teacher: TeacherConfig = field(
        default_factory=TeacherConfig, metadata={"only": (LM,), "help": "where the LM teacher runs (--teacher DIR, NAME or URL)"}
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"only": (LM,), "help": "a LoRA adapter on the LM student (peft)"})
    reward: RewardConfig = field(
        default_factory=RewardConfig, metadata={"only": (LM,), "help": "reward-aware LM methods (grpo, rlad): group, trust region"}
    )
    qcrd: QCRDConfig = field(
        default_factory=QCRDConfig, metadata={"only": (LM,), "help": "qcrd: negatives' lag and temperature, margin, weight"}
    )
    grad_accum: int = _f(1, "LM: micro-batches per optimiser step", only=(LM,), valid=COUNT)
    epochs: int = _f(30, "training epochs", valid=COUNT)
    steps: int = _f(
        0,
        "LMs and diffusion: optimiser steps to train for, rounded to whole epochs (0 = use epochs); equal budgets across data sizes",
        only=(LM, DIFFUSION),
        valid=NONNEG,
    )
    batch_size: int = _f(64, "rows per optimiser step", valid=COUNT)
    lr: float = _f(3e-3, "AdamW learning rate", valid=POSITIVE)
    weight_decay: float = _f(1e-4, "AdamW weight decay", valid=NONNEG)
    max_grad_norm: float = _f(
        1.0,
        "LMs and diffusion: clip the gradient norm to this before each step (0 = no clipping)",
        only=(LM, DIFFUSION),
        valid=NONNEG,
    )
    temperature: float = _f(2.0, "softmax temperature of the distillation term", only=(CLASSIFIER, LM), valid=POSITIVE)
    alpha: float = _f(
        0.5, "weight of the distillation term; (1-alpha) goes to CE on gold labels", only=(CLASSIFIER, LM), valid=UNIT
    )
    beta: float = _f(0.5, "jsd interpolation: 0 = forward KL, 1 = reverse KL", only=(CLASSIFIER, LM), valid=UNIT)
    skew: float = _f(0.1, "skew-kl mixing weight a in KL(p_t || a p_t + (1-a) p_s)", only=(CLASSIFIER, LM), valid=UNIT)
    reverse_skew: bool = _f(False, "skew-kl: use the reverse variant KL(p_s || a p_s + (1-a) p_t)", only=(CLASSIFIER, LM))
    augment: str = _f("none", "training augmentation: none, weak or strong", only=(CLASSIFIER,))
    checkpoint: str = _f("best", "which epoch's weights to keep: best (dev accuracy) or last", only=(CLASSIFIER, LM))
    labeled_fraction: float = _f(
        1.0,
        "keep gold labels for this share of train rows (stratified); label-free methods (ssld, random-teacher) use every row",
        only=(CLASSIFIER,),
        valid=SHARE,
    )
    generations: int = _f(
        4, "self-distill / anchored: distillation rounds after the first model", only=(CLASSIFIER,), valid=NONNEG
    )
    gt_weight: float = _f(
        -1.0,
        "self-distill: weight of gold labels in each round's target; -1 = the closed-form optimum per round",
        only=(CLASSIFIER,),
        valid=Range(0, 1, also=(-1,)),
    )
    anchor: float = _f(0.5, "anchored: weight of the base teacher in each round's target", only=(CLASSIFIER,), valid=UNIT)
    pskd_alpha: float = _f(0.8, "pskd: final weight a_T of the model's own past predictions", only=(CLASSIFIER,), valid=UNIT)
    probe_dim: int = _f(128, "random-teacher: output size of the random teacher's projection", only=(CLASSIFIER,), valid=COUNT)
    feature_weight: float = _f(
        1.0, "fitnet, mi-alpha: weight of the intermediate-representation term beside KD + CE", only=(CLASSIFIER,), valid=NONNEG
    )
    mi_alpha: float = _f(
        0.5, "mi-alpha: alpha of the I_alpha bound, 0 (NWJ: unbiased, high variance) to 1 (InfoNCE: low variance)",
        only=(CLASSIFIER,), valid=UNIT,
    )  # fmt: skip
    search_budget: int = _f(
        0, "student-search: most parameters a candidate student may have (0 = the configured student's count)",
        only=(CLASSIFIER,), valid=NONNEG,
    )  # fmt: skip
    search_population: int = _f(8, "student-search: candidates per generation of the evolutionary search", only=(CLASSIFIER,), valid=Range(2))
    search_generations: int = _f(4, "student-search: generations after the first population", only=(CLASSIFIER,), valid=NONNEG)
    search_method: str = _f("kd", "student-search: the method that then trains the winning architecture", only=(CLASSIFIER,))
    competitive_rounds: int = _f(3, "competitive: rounds of student training and teacher feedback", only=(CLASSIFIER,), valid=COUNT)
    hard_share: float = _f(
        0.2, "competitive: share of train rows the student finds hardest (largest KL to the teacher), up-weighted next round",
        only=(CLASSIFIER,), valid=SHARE,
    )  # fmt: skip
    images_per_class: int = _f(10, "dataset-distill: synthetic rows per class", only=(CLASSIFIER,), valid=COUNT)
    dd_experts: int = _f(3, "dataset-distill: expert networks trained on the real data, whose trajectories are matched", only=(CLASSIFIER,), valid=COUNT)
    dd_expert_epochs: int = _f(15, "dataset-distill: epochs of each expert (one saved point per epoch)", only=(CLASSIFIER,), valid=Range(2))
    dd_expert_lr: float = _f(0.05, "dataset-distill: the experts' SGD learning rate", only=(CLASSIFIER,), valid=POSITIVE)
    dd_clip: float = _f(2.0, "dataset-distill: per-row CE of the experts clipped at this (smooth experts; 0 = no clipping)", only=(CLASSIFIER,), valid=NONNEG)
    dd_penalty: float = _f(0.01, "dataset-distill: weight of the experts' gradient-norm penalty (smooth experts)", only=(CLASSIFIER,), valid=NONNEG)
    dd_iterations: int = _f(300, "dataset-distill: updates of the synthetic set (0 = random real rows, the baseline)", only=(CLASSIFIER,), valid=NONNEG)
    dd_inner_steps: int = _f(20, "dataset-distill: N, student steps on the synthetic set per match", only=(CLASSIFIER,), valid=COUNT)
    dd_match_epochs: int = _f(2, "dataset-distill: M, expert epochs the N steps must cover", only=(CLASSIFIER,), valid=COUNT)
    dd_image_lr: float = _f(0.1, "dataset-distill: Adam learning rate of the synthetic rows", only=(CLASSIFIER,), valid=POSITIVE)
    dd_student_epochs: int = _f(300, "dataset-distill: epochs of the student trained on the synthetic set", only=(CLASSIFIER,), valid=COUNT)
    meta_target: str = _f(
        "", "meta-dmoe: the unseen domain (a data.domains name) whose unlabelled train rows adapt the student after "
        "meta-training ('' = save the meta-trained student unadapted)", only=(CLASSIFIER,),
    )  # fmt: skip
    meta_epochs: int = _f(20, "meta-dmoe: epochs of meta-training after `epochs` of plain CE on the source domains", only=(CLASSIFIER,), valid=COUNT)
    adapt_steps: int = _f(1, "meta-dmoe: gradient steps of the student's features towards the aggregated experts', in meta-training and at test time", only=(CLASSIFIER,), valid=COUNT)
    adapt_lr: float = _f(0.1, "meta-dmoe: step size of those adaptation steps", only=(CLASSIFIER,), valid=POSITIVE)
    adapt_support: int = _f(64, "meta-dmoe: unlabelled rows of the unseen domain the student adapts on", only=(CLASSIFIER,), valid=COUNT)
    mt_kind: str = _f(
        "home", "multi-gate: the student, home (shared + per-task experts, per-task gates), gmope (prompt experts), "
        "flexmore (rank-heterogeneous LoRA experts) or shared-bottom (the dense baseline)", only=(CLASSIFIER,),
        choices=("home", "gmope", "flexmore", "shared-bottom"),
    )  # fmt: skip
    mt_tasks: list[str] = _f(
        ["label", "parity", "high", "round"], "multi-gate: the tasks, label (the data's classes) first; on digits also parity, "
        "high, round, prime (maps of the digit)", only=(CLASSIFIER,),
    )  # fmt: skip
    mt_experts: int = _f(4, "multi-gate: shared experts (home) or experts (gmope); model.width units each", only=(CLASSIFIER,), valid=COUNT)
    mt_task_experts: int = _f(1, "multi-gate home: experts of each task's own", only=(CLASSIFIER,), valid=NONNEG)
    mt_ranks: list[int] = _f([1, 4, 16], "multi-gate flexmore: the rank of each expert's adapter", only=(CLASSIFIER,))
    mt_top_k: int = _f(0, "multi-gate: experts each row's gate keeps (sparse routing; 0 = a soft mix of all)", only=(CLASSIFIER,), valid=NONNEG)
    mt_balance: float = _f(
        10.0, "multi-gate with mt_sequential: weight of the term that steers a new task's gate off the experts earlier tasks use",
        only=(CLASSIFIER,), valid=NONNEG,
    )  # fmt: skip
    mt_orthogonality: float = _f(0.1, "multi-gate gmope: weight of the prompts' soft orthogonality penalty", only=(CLASSIFIER,), valid=NONNEG)
    mt_sequential: bool = _f(
        False, "multi-gate: the tasks arrive in sequence (epochs each, earlier tasks' data gone); records forgetting",
        only=(CLASSIFIER,),
    )  # fmt: skip
    critic_temperature: float = _f(
        0.1, "mi-alpha, hybrid: temperature of the cosine critic / sample-relation softmax", only=(CLASSIFIER,), valid=POSITIVE
    )
    probe_epochs: int = _f(300, "random-teacher: full-batch steps of the linear probe", only=(CLASSIFIER,), valid=COUNT)
    rotations: int = _f(4, "sla-sd: rotations (of 90 degrees) in the joint label space", only=(CLASSIFIER,), valid=Range(2, 4))
    expert_lambdas: list[float] = _f(
        [], "mdcs: logit-adjustment weight per expert; [] = evenly from -0.5 to 2.5", only=(CLASSIFIER,)
    )
    consistency_weight: float = _f(
        1.0, "mdcs: weight of consistency self-distillation (ramped in linearly)", only=(CLASSIFIER,), valid=NONNEG
    )
    top_k: int = _f(1, "mst: teachers the gate selects per row", only=(CLASSIFIER, LM), valid=COUNT)
    gate: str = _f(
        "confidence", "mst on LM teacher data: how a teacher is picked per prompt: confidence (its samples agree most, "
        "label-free) or task (the teacher trained on the prompt's task)",
        only=(LM,),
    )  # fmt: skip
    lmbda: float = _f(
        0.5, "on-policy: share of batches whose completions the student samples itself (GKD's lambda)", only=(LM,), valid=UNIT
    )
    demos: int = _f(
        0,
        "LMs: put the k most similar other teacher demonstrations in each prompt (an ICD-ready student)",
        only=(LM,),
        valid=NONNEG,
    )
    retriever: str = _f("auto", "LMs with demos: dense, bm25 or auto (dense, else bm25); use the cascade's setting", only=(LM,))
    embedder: str = _f("all-minilm-l6-v2", "LMs with demos: sentence model of dense retrieval", only=(LM,))
    tsd_margin: float = _f(
        0.0,
        "tsd: distil a token when the teacher's top-1 probability exceeds the student's by more than this",
        only=(LM,),
    )
    tsd_entropy: float = _f(
        0.01, "tsd: weight of the student-entropy penalty (keeps the student confident)", only=(LM,), valid=NONNEG
    )
    balance_weight: float = _f(0.01, "mst: weight of the gate's load-balancing loss", only=(CLASSIFIER,), valid=NONNEG)
    seed: int = _f(0, "training seed", valid=NONNEG)


@dataclass
class SCMoEOptions:
    """The settings of SCMoE decoding (``decode: scmoe``), shared by every stage that decodes
    with an MoE language model (generate-teacher-data and evaluate)."""

    scmoe_beta: float = _f(
        0.5, "scmoe: contrast strength b in (1+b) z_strong - b z_weak (0 = the model's own choice)", only=(LM,), valid=NONNEG
    )
    scmoe_alpha: float = _f(
        0.1, "scmoe: keep tokens with p_strong >= alpha * max p_strong, in (0, 1]", only=(LM,), valid=SHARE
    )
    scmoe_weak_rank: int = _f(
        2, "scmoe: the weak pass routes each token to its rank-th expert alone (1 = the top one)", only=(LM,), valid=COUNT
    )


@dataclass
class GenerateTeacherDataConfig(SCMoEOptions):
    batch_size: int = _f(256, "rows per teacher forward pass", valid=COUNT)
    shard_rows: int = _f(
        512, "rows per Parquet part; a killed run resumes at the last complete part", only=(CLASSIFIER,), valid=COUNT
    )
    splits: list[str] = _f(["train", "dev", "test"], "splits to run the teacher on", only=(CLASSIFIER, LM), choices=SPLITS)
    samples: int = _f(1, "LMs: completions sampled per prompt", only=(LM,), valid=COUNT)
    temperature: float = _f(1.0, "LMs: sampling temperature (0 = greedy)", only=(LM,), valid=NONNEG)
    top_p: float = _f(1.0, "LMs: nucleus sampling mass", only=(LM,), valid=SHARE)
    max_new_tokens: int = _f(16, "LMs: completion length limit", only=(LM,), valid=COUNT)
    top_k: int = _f(20, "LMs: teacher log-probs stored per generated token (0 = none)", only=(LM,), valid=NONNEG)
    shard_prompts: int = _f(
        64, "LMs: prompts per Parquet part; a killed run resumes at the last complete part", only=(LM,), valid=COUNT
    )
    teacher: TeacherConfig = field(
        default_factory=TeacherConfig, metadata={"only": (LM,), "help": "where the LM teacher runs (--teacher DIR, NAME or URL)"}
    )
    agent: AgentConfig = field(
        default_factory=AgentConfig, metadata={"only": (LM,), "help": "agent trajectories: the teacher solves with a code tool"}
    )
    routing: str = _f(
        "auto",
        "LMs: store the teacher's routed experts per generated token: auto (when it is MoE), on (require it) or off",
        only=(LM,),
    )
    decode: str = _f(
        "greedy",
        "LMs: greedy (the model's own distribution) or scmoe (MoE self-contrast; stored top-k stay the model's own)",
        only=(LM,),
    )
    noise_samples: int = _f(
        1024, "diffusion: samples drawn from seeded noise (sample i from noise seed `seed` + i)", only=(DIFFUSION,), valid=COUNT
    )
    steps: int = _f(
        50,
        "diffusion: sampling steps (diffusion teachers: ODE solver steps; consistency students: their steps)",
        only=(DIFFUSION,),
        valid=COUNT,
    )
    solver: str = _f(
        "ddim", "diffusion teachers: ODE solver: ddim, euler or heun (heun: 2 evaluations a step but the last)", only=(DIFFUSION,)
    )
    save_every: int = _f(
        1,
        "diffusion: store the state after every k-th step, besides the noise and the final sample (0 = those two only)",
        only=(DIFFUSION,),
        valid=NONNEG,
    )
    shard_samples: int = _f(
        256,
        "diffusion: trajectories per safetensors shard / Parquet part; a killed run resumes at the last one",
        only=(DIFFUSION,),
        valid=COUNT,
    )
    hybrid_first_step: str = _f(
        "",
        "diffusion: a diffusion teacher directory that takes the first step, the model the rest ('' = off)",
        only=(DIFFUSION,),
    )
    seed: int = _f(0, "seed", valid=NONNEG)


@dataclass
class SelectConfig:
    by: str = _f("confident", "selection strategy: see `distil select --help`", only=(CLASSIFIER, LM))
    threshold: float = _f(
        0.0,
        "confident: also keep rows whose teacher max-prob >= threshold (0 = keep only correct rows)",
        only=(CLASSIFIER,),
        valid=UNIT,
    )
    require_correct: bool = _f(True, "confident: keep rows the teacher classifies correctly", only=(CLASSIFIER,))
    splits: list[str] = _f(
        ["train"], "splits the selection applies to; other splits pass through unchanged", only=(CLASSIFIER, LM), choices=SPLITS
    )
    min_agreement: float = _f(
        0.0, "LM majority: keep prompts whose majority answer has at least this share of the samples", only=(LM,), valid=UNIT
    )
    min_score: float = _f(1.0, "LM correct: keep samples whose verified score reaches this", only=(LM,), valid=UNIT)
    min_tokens: int = _f(1, "LM length: shortest completion kept, in tokens", only=(LM,), valid=NONNEG)
    uncertain_samples: int = _f(4, "LM uncertain: completions the student samples per prompt", only=(LM,), valid=COUNT)
    uncertain_share: float = _f(
        0.25, "LM uncertain: share of prompts kept, the student's least consistent first", only=(LM,), valid=SHARE
    )
    max_new_tokens: int = _f(16, "LM uncertain: length of the student's samples", only=(LM,), valid=COUNT)
    max_tokens: int = _f(10_000, "LM length: longest completion kept, in tokens", only=(LM,), valid=NONNEG)
    seed: int = _f(0, "seed", only=(CLASSIFIER, LM), valid=NONNEG)


@dataclass
class CascadeConfig:
    policy: str = _f(
        "auto",
        "classifiers: confidence or views; LMs: see `distil cascade --help`; auto = confidence / icd-sc-cascade",
        only=(CLASSIFIER, LM),
    )
    target_accuracy: float = _f(-1.0, "dev accuracy to reach; < 0 = teacher dev accuracy minus `margin`", only=(CLASSIFIER, LM))
    margin: float = _f(0.005, "accuracy below the teacher's that the default target allows", only=(CLASSIFIER, LM))
    confidence: float = _f(
        0.9,
        "the target must hold in this share of bootstrap resamples of dev (0 = on dev as it is)",
        only=(CLASSIFIER, LM),
        valid=UNIT,
    )
    views: int = _f(8, "views: augmented views per row", only=(CLASSIFIER,), valid=COUNT)
    augment: str = _f("weak", "views: augmentation strength (weak or strong)", only=(CLASSIFIER,))
    batch_size: int = _f(
        256, "rows per forward pass (LMs: sequences per generate call, samples included)", only=(CLASSIFIER, LM), valid=COUNT
    )
    teacher: TeacherConfig = field(
        default_factory=TeacherConfig, metadata={"only": (LM,), "help": "where the LM teacher runs (--teacher DIR, NAME or URL)"}
    )
    samples: int = _f(5, "LMs: student samples per query (n) of the self-consistency policies", only=(LM,), valid=COUNT)
    sample_budget: float = _f(
        0.0, "LMs, blend-asc: mean student samples per query over each query batch, in [1, samples] (0 = samples)",
        only=(LM,), valid=NONNEG,
    )  # fmt: skip
    temperature: float = _f(0.7, "LMs: student sampling temperature of the self-consistency policies", only=(LM,), valid=NONNEG)
    stop_confidence: float = _f(
        0.95,
        "LMs, adaptive: stop once the leading answer beats the runner-up with this posterior probability (1 = only when all n samples could not change the decision)",
        only=(LM,),
        valid=Range(0.5, 1, low_open=True),
    )
    top_p: float = _f(1.0, "LMs: nucleus mass of the student's samples", only=(LM,), valid=SHARE)
    max_new_tokens: int = _f(16, "LMs: completion length of every model", only=(LM,), valid=COUNT)
    seed_per_query: bool = _f(
        False,
        "LMs: generate each query alone, seeded by its prompt (slower): its samples depend on nothing else, so `distil serve --policy-file` decides as this run",
        only=(LM,),
    )
    demos: int = _f(
        4,
        "LMs: teacher demonstrations per student prompt (k) for icd policies; adaptive and weighted-vote use them when > 0",
        only=(LM,),
        valid=NONNEG,
    )
    retriever: str = _f(
        "auto", "LMs: demonstration search: dense (sentence embeddings), bm25, or auto (dense, else bm25)", only=(LM,)
    )
    embedder: str = _f(
        "all-minilm-l6-v2",
        "LMs: sentence model of dense retrieval (the packaged one, a directory or a cached hub id)",
        only=(LM,),
    )
    bank_verified: bool = _f(False, "LMs: keep only demonstrations whose teacher answer the task scored correct", only=(LM,))
    online: bool = _f(False, "LMs: the teacher's answers to deferred test queries join the bank for later queries", only=(LM,))
    query_batch: int = _f(
        32, "LMs: test queries routed per step, in order (with online the bank grows between steps)", only=(LM,), valid=COUNT
    )
    threshold: float = _f(
        -1.0,
        "LMs: use this agreement threshold instead of calibrating (-1 = calibrate on dev)",
        only=(LM,),
        valid=Range(0, 1, also=(-1,)),
    )
    budget: float = _f(
        0.0,
        "LMs: > 0 = calibrate to the most accurate threshold costing at most this share of teacher-only",
        only=(LM,),
        valid=NONNEG,
    )
    costs: dict = _f(
        {}, "LMs: price per 1k tokens, {student: {input: P, output: P}, teacher: {...}}; {} = cost in FLOPs", only=(LM,)
    )
    seed: int = _f(0, "seed", only=(CLASSIFIER, LM), valid=NONNEG)


@dataclass
class EvaluateConfig(SCMoEOptions):
    bins: int = _f(15, "equal-width confidence bins of ECE and the reliability diagram", only=(CLASSIFIER,), valid=COUNT)
    many_shot: int = _f(50, "classes with more train rows than this are 'many-shot'", only=(CLASSIFIER,), valid=NONNEG)
    few_shot: int = _f(
        15, "classes with fewer train rows than this are 'few-shot' (the rest 'medium')", only=(CLASSIFIER,), valid=NONNEG
    )
    split: str = _f("test", "split to evaluate on", only=(CLASSIFIER, LM), choices=SPLITS)
    max_new_tokens: int = _f(16, "LMs: completion length when scoring answers", only=(LM,), valid=COUNT)
    samples: int = _f(
        1,
        "LMs: sampled completions per prompt for maj@n / pass@n and vote-share calibration (1 = greedy only)",
        only=(LM,),
        valid=COUNT,
    )
    temperature: float = _f(1.0, "LMs: sampling temperature for samples > 1", only=(LM,), valid=NONNEG)
    top_p: float = _f(1.0, "LMs: nucleus mass for samples > 1", only=(LM,), valid=SHARE)
    batch_size: int = _f(512, "rows per forward pass", only=(CLASSIFIER, LM), valid=COUNT)
    routing_segment: int = _f(
        16, "MoE LMs: segment length m of the routing metrics SRP and SCH (tokens)", only=(LM,), valid=COUNT
    )
    routing_cache: int = _f(
        0, "MoE LMs: SCH cache size in experts per layer (0 = 2 x experts per token)", only=(LM,), valid=NONNEG
    )
    decode: str = _f(
        "greedy", "LMs: greedy (the model's own choice) or scmoe (MoE self-contrast decoding, also for samples > 1)", only=(LM,)
    )
    agent: AgentConfig = field(
        default_factory=AgentConfig,
        metadata={"only": (LM,), "help": "run each model as an agent with a code tool; score its final answer, count its tool calls"},
    )
    steps: int = _f(
        1,
        "generators: sampling steps (consistency students: 1, 2, 4...; diffusion teachers: ODE solver steps)",
        only=(DIFFUSION,),
        valid=COUNT,
    )
    solver: str = _f("ddim", "generators: ODE solver of diffusion teachers: ddim, euler or heun", only=(DIFFUSION,))
    hybrid_first_step: str = _f(
        "",
        "generators: a diffusion teacher directory that takes the first sampling step, the model the rest ('' = off)",
        only=(DIFFUSION,),
    )
    step_counts: list[int] = _f(
        [],
        "generators: step counts of the evaluation table, one row per model and count ([] = [steps])",
        only=(DIFFUSION,),
        valid=COUNT,
    )
    n_samples: int = _f(
        2000, "generators: samples per model and step count (sample i from noise seed + i)", only=(DIFFUSION,), valid=Range(2)
    )
    teacher: str = _f(
        "",
        "generators: diffusion teacher folder; paired error to its teacher_steps-step ODE samples. LMs: the teacher the "
        "models are compared with (per-token KL, top-1 and greedy agreement, speed-up) ('' = none)",
        only=(DIFFUSION, LM),
    )
    teacher_steps: int = _f(50, "generators: ODE steps of the teacher's paired-error reference", only=(DIFFUSION,), valid=COUNT)
    merge: list[str] = _f(
        [], "generators: two folders [A, B] of students of one teacher whose interpolated weights are evaluated too", only=(DIFFUSION,)
    )
    merge_alphas: list[float] = _f(
        [0.5], "generators with merge: weights alpha of (1 - alpha) A + alpha B, one model each", only=(DIFFUSION,), valid=Range(0, 1)
    )
    guidance: list[float] = _f(
        [],
        "class-conditional generators: classifier-free guidance weights w, one row each: sample i of class i % classes, "
        "guided (1 + w) F(x, c) - w F(x, null) ([] = unconditional samples only)",
        only=(DIFFUSION,),
        valid=NONNEG,
    )
    control: str = _f(
        "", "generators: a control-lora folder whose adapter is applied unchanged to every model evaluated (rows /control: "
        "the share of samples of its class, with and without it) ('' = none)", only=(DIFFUSION,),
    )
    time_samples: int = _f(
        256, "generators: samples per timing call of seconds_per_1k (0 = no timing)", only=(DIFFUSION,), valid=NONNEG
    )
    seed: int = _f(0, "seed", valid=NONNEG)


@dataclass
class ServeConfig:
    """`distil serve`: a student, a teacher or a calibrated cascade behind an OpenAI-compatible API."""

    host: str = _f("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)", only=(LM,))
    port: int = _f(8000, "port to listen on", only=(LM,), valid=Range(1, 65535))
    model_name: str = _f("", "the model's name in /v1/models and requests ('' = the model directory's name)", only=(LM,))
    max_concurrency: int = _f(64, "requests in flight at once; more are answered 429", only=(LM,), valid=COUNT)
    max_tokens: int = _f(512, "the largest max_tokens a request may ask for", only=(LM,), valid=COUNT)
    max_batch: int = _f(32, "concurrent requests batched into one forward pass", only=(LM,), valid=COUNT)
    batch_wait_ms: float = _f(
        0.0,
        "how long an idle engine waits for more requests before it starts a batch (ms); while it is busy, requests gather anyway",
        only=(LM,),
        valid=NONNEG,
    )
    max_logprobs: int = _f(20, "the most top log-probs a request may ask for per token", only=(LM,), valid=NONNEG)
    seed: int = _f(0, "seed of requests that name none", only=(LM,), valid=NONNEG)


def from_dict(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    """Build ``cls`` from a mapping, recursing into nested dataclasses; unknown keys raise."""
    values = dict(values or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = sorted(map(str, set(values) - names))  # YAML keys may be numbers too
    if unknown:
        raise DistilError(
            f"unknown key(s) {', '.join(unknown)} in params section '{where}'; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise DistilError(f"params '{where}.{name}' must be a mapping, got {value!r}")
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
            _check_range(kwargs[name], fields[name].metadata.get("valid"), f"{where}.{name}")
            _check_choices(kwargs[name], fields[name].metadata.get("choices"), f"{where}.{name}")
    return cls(**kwargs)


def _check_range(value: Any, valid: Range | None, where: str) -> None:
    """Refuse a number (or a list item) outside the field's declared range."""
    if valid is None:
        return
    items = value if isinstance(value, list) else [value]
    if any(v not in valid for v in items):
        what = f"a list of numbers {valid}" if isinstance(value, list) else str(valid)
        raise DistilError(f"params {where} must be {what}, got {value}")


def _check_choices(value: Any, choices: tuple | None, where: str) -> None:
    """Refuse a word (or a list item) outside the field's fixed set (a split named 'valid')."""
    bad = [v for v in (value if isinstance(value, list) else [value]) if v not in choices] if choices else []
    if bad:
        raise DistilError(f"params {where} must be one of {', '.join(choices)}, got {', '.join(map(str, bad))}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    if hint is str and isinstance(value, bool):  # YAML 1.1 reads on/off (yes/no) as booleans; text settings mean the words
        return "on" if value else "off"
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as text
        return float(value)
    if origin is list and isinstance(value, list):
        inner = hint.__args__[0]
        return [_coerce(v, inner, where) for v in value]
    if hint is dict and isinstance(value, dict):
        return value
    if origin is list and isinstance(value, str):  # --set splits=train,dev or sizes=20,4,4
        inner = hint.__args__[0]
        return [v if inner is str else _coerce(_yaml_scalar(v), inner, where) for v in value.split(",") if v]
    raise DistilError(f"params '{where}' must be {getattr(hint, '__name__', hint)}, got {value!r}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=3", "model.width=16"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise DistilError(f"--set expects key=value, got '{pair}'")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DistilError(f"--set {key}: '{p}' was already set to a value; set either {p} or its keys")
        if isinstance(node.get(leaf), dict):
            raise DistilError(f"--set {key}: its keys were already set; set either {key} or its keys")
        node[leaf] = _yaml_scalar(raw) if raw else ""
    return out


def _yaml_scalar(raw: str) -> Any:
    """``raw`` read as YAML (3 -> int, [1, 2] -> list); text YAML cannot read (``[1``, ``!x``)
    stays text, for the setting's type check to accept or refuse in one line."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def read_params(path: Path | None) -> dict[str, Any]:
    """The whole params file; a missing default params.yaml means "all defaults"."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        if path.name == "params.yaml" and path.parent == Path("."):
            return {}
        raise DistilError(f"params file {path} not found; pass an existing --params file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise DistilError(f"params file {path} is not valid YAML ({first}); fix the syntax") from None
    if not isinstance(loaded, dict):
        raise DistilError(f"params file {path} must be a mapping of sections")
    return loaded


def load_section(
    cls: type[T], params: dict[str, Any], section: str, overrides: dict[str, Any] | None = None, *, shared: bool = False
) -> T:
    """One stage's config: the section of the params file, then ``--set`` overrides on top.

    The keys given for this run are remembered for ``check_modality``: the overrides, and the
    section's own keys unless ``shared`` (a command's default section, which runs of every
    modality read, may hold settings of each)."""
    raw = params.get(section) or {}
    if not isinstance(raw, dict):
        raise DistilError(f"params section '{section}' must be a mapping")
    cfg = from_dict(cls, _merge(raw, overrides or {}), section)
    object.__setattr__(cfg, "_given", frozenset(overrides or {}) | (frozenset() if shared else frozenset(raw)))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


RUNS = {"GenerateTeacherDataConfig": "teachers", "SelectConfig": "selections", "DistillConfig": "students",
        "CascadeConfig": "cascades", "EvaluateConfig": "evaluations"}  # fmt: skip
"""What a run of each stage is called in ``check_modality``'s message."""


PER_MODALITY = ("model", "lm", "diffusion")
"""The nested sub-sections one params section may hold side by side, one per modality."""


def check_modality(cfg: Any, modality: str) -> None:
    """A setting given for this run that only another modality reads is an error naming the
    modality it belongs to: it would otherwise be silently ignored. Given means set in the
    run's params section or by ``--set`` (see ``load_section``); for a config built in code,
    every value other than the default.

    The nested sub-sections (``model`` for classifiers, ``lm``, ``diffusion``) are the
    exception by design: one params section may hold one sub-section per modality, and a
    run reads its own."""
    given = getattr(cfg, "_given", None)
    for f in dataclasses.fields(cfg):
        owners = f.metadata.get("only", EVERY)
        if modality in owners or (dataclasses.is_dataclass(getattr(cfg, f.name)) and f.name in PER_MODALITY):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if (f.name in given) if given is not None else getattr(cfg, f.name) != default:
            whose, what = " and ".join(MODALITY_NAMES[o] for o in owners), RUNS.get(type(cfg).__name__, "runs")
            raise DistilError(
                f"setting '{f.name}' is for {whose} {what}, not {MODALITY_NAMES[modality]} {what}; "
                "drop it from the params section and --set"
            )
