"""The vLLM ``Teacher`` (``teacher.backend: vllm``, the optional extra ``distil[vllm]``):
a local model directory or hub name run by a ``vllm.LLM`` engine in this process.

``generate`` asks vLLM for ``n`` samples per prompt with ``logprobs=k``; vLLM's default
``logprobs_mode`` (raw log-probs) gives the untempered distribution, as the transformers
backend stores. Each position's dict holds the top-k and the sampled token (k + 1 entries
when the sampled one is not among them); the top-k are the entries of rank <= k.
``score`` reads ``prompt_logprobs`` of prompt + completion (vLLM's extension: the first
prompt position has none). ``teacher.vllm_args`` are passed to ``vllm.LLM`` (dtype,
gpu_memory_utilization, max_model_len, tensor_parallel_size, ...).
"""

from __future__ import annotations

import numpy as np

from stages.errors import DistilError
from stages.lm.teachers.base import Completion, Sampling, Scored


def _vllm():
    try:
        import vllm
    except ImportError:
        raise DistilError(
            "teacher.backend=vllm needs vLLM: pip install 'distil[vllm]' (it pins its own torch: use a separate environment)"
        ) from None
    return vllm


class VLLMTeacher:
    def __init__(self, spec: str, cfg):
        from stages.lm.models import SHIPPED, lm_identity

        if spec in SHIPPED:
            raise DistilError(f"{spec} ships as GGUF for transformers; serve it with teacher.backend=transformers")
        vllm = _vllm()
        self.engine = vllm.LLM(model=str(spec), trust_remote_code=False, **dict(cfg.vllm_args))
        self.tokenizer = self.engine.get_tokenizer()
        self.identity = {"backend": "vllm", **lm_identity(spec)}
        self.context = int(self.engine.llm_engine.model_config.max_model_len)

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Completion]:
        vllm = _vllm()
        greedy = sampling.temperature <= 0
        params = vllm.SamplingParams(
            n=n, temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens, logprobs=sampling.top_k or None, seed=sampling.seed,
        )  # fmt: skip
        out = []
        for request in self.engine.generate(prompts, params, use_tqdm=False):
            for c in sorted(request.outputs, key=lambda o: o.index):
                ids = list(c.token_ids)
                top_ids, top_lp = _top_k(c.logprobs or [], sampling.top_k) if sampling.top_k else ([], np.zeros(0, np.float32))
                out.append(Completion(
                    text=c.text, token_ids=ids, seq_logprob=c.cumulative_logprob, topk_ids=top_ids, topk_logprobs=top_lp,
                    k=sampling.top_k, finish_reason="length" if c.finish_reason == "length" else "stop",
                    prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(ids),
                ))  # fmt: skip
        return out

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], top_k: int) -> list[Scored]:
        vllm = _vllm()
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
        seqs = [{"prompt_token_ids": p + c} for p, c in zip(prompt_ids, completion_ids, strict=True)]
        out = []
        for request, p, c in zip(self.engine.generate(seqs, params, use_tqdm=False), prompt_ids, completion_ids, strict=True):
            rows = request.prompt_logprobs[len(p) : len(p) + len(c)]
            chosen = np.array([row[t].logprob for row, t in zip(rows, c, strict=True)], np.float32)
            ids, lps = _top_k(rows, top_k)
            out.append(Scored(chosen, np.asarray(ids, np.int64).reshape(len(c), top_k), np.asarray(lps, np.float32).reshape(len(c), top_k)))
        return out

    def close(self) -> None:
        self.engine = None


def _top_k(positions: list[dict], k: int) -> tuple[list[int], np.ndarray]:
    """Flat top-k ids and float32 log-probs (token-major, best first) of vLLM's per-position
    ``{token_id: Logprob}`` dicts."""
    ids, lps = [], []
    for pos in positions:
        best = sorted(pos.items(), key=lambda kv: -kv[1].logprob)[:k]
        ids += [int(t) for t, _ in best]
        lps += [float(v.logprob) for _, v in best]
    return ids, np.asarray(lps, np.float32)
