"""The vLLM backend: refused with the install line where vLLM is absent (always tested),
and, where vLLM is installed, the same greedy tokens and top-k as the in-process teacher."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from stages.config import TeacherConfig
from stages.errors import DistilError
from stages.lm.teachers import Sampling, open_teacher
from tests.lm.serve.serve_helpers import tiny_lm

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
WHY = "vLLM is not installed: its PyPI wheel is a CUDA build and this machine has no GPU (install distil[vllm] in its own environment)"


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here; the refusal is for machines without it")
def test_vllm_backend_without_vllm_is_one_clear_line(tmp_path_factory):
    with pytest.raises(DistilError, match=r"pip install 'distil\[vllm\]'"):
        open_teacher(tiny_lm(tmp_path_factory), TeacherConfig(backend="vllm"), torch.device("cpu"))


def test_vllm_backend_refuses_a_url():
    with pytest.raises(DistilError, match="teacher.backend=vllm needs a model directory"):
        open_teacher("http://127.0.0.1:9/v1", TeacherConfig(backend="vllm"), torch.device("cpu"))


@pytest.mark.skipif(not HAVE_VLLM, reason=WHY)
def test_vllm_greedy_matches_the_transformers_teacher(tmp_path_factory):
    path = tiny_lm(tmp_path_factory)
    local = open_teacher(path, TeacherConfig(), torch.device("cpu"))
    engine = open_teacher(path, TeacherConfig(backend="vllm", vllm_args={"dtype": "float32"}), "cpu")
    prompts = ["Question: 3 + 4\nAnswer:", "Question: 10 + 2\nAnswer:"]
    want = local.generate(prompts, 1, Sampling(temperature=0, max_new_tokens=4, top_k=5))
    got = engine.generate(prompts, 1, Sampling(temperature=0, max_new_tokens=4, top_k=5))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.float32(g.topk_logprobs), np.float32(w.topk_logprobs), atol=2e-2)
