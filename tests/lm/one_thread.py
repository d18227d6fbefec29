"""The ``one_thread`` fixture of the LM test files that train tiny models: import it
(``from one_thread import one_thread``) and it applies to that whole module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread; this also keeps a file's runtime
    independent of OMP_NUM_THREADS (two threads on two busy cores are ~7x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
