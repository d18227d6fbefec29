"""distil's library: one module per CLI command, plus losses, selectors, models, tasks and artifacts.

Nothing here imports Typer or DVC, so every stage can be scripted from Python:
``stages.distill.run(cfg, data=..., out=...)``.
"""

__version__ = "0.1.0"
