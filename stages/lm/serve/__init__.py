"""`distil serve` for language models: any ``Teacher`` engine behind an OpenAI-compatible
API (FastAPI + uvicorn).

``protocol`` (request models, error bodies), ``batching`` (the async micro-batcher),
``tokens`` and ``render`` (log-probs, text offsets, OpenAI objects and stream chunks),
``answers`` (requests -> engine calls -> choices), ``app`` (``build_app``) and ``server``
(``run``: open the model, bind, serve until SIGTERM).
"""

from stages.lm.serve.app import build_app
from stages.lm.serve.server import run

__all__ = ["build_app", "run"]
