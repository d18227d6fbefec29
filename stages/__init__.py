"""distil's library: five commands x three modalities.

- ``generate_teacher_data``, ``select``, ``distill``, ``cascade``, ``evaluate``: one
  router per command; each asks ``modality`` what its input is, refuses a pair the
  modality does not support and calls ``<modality>.<command>.run`` (the same signature
  for every modality);
- ``classifier/``, ``lm/``, ``diffusion/``: one package per modality, each holding its
  implementation of the commands it supports, its models, training loop and methods table;
  a modality package never imports another;
- shared ground: ``modality`` (the one detection), ``config`` (params sections, settings
  tagged with the modalities that read them), ``artifacts/`` (schemas and manifest kinds,
  atomic stores, provenance), ``losses/`` (pure tensor functions shared by classifiers and
  LMs), ``tasks/`` (built-in data and user tables), ``runlog`` (a training run's dvclive
  log, training.json and manifest), ``selection`` (select's pass-through and tallies),
  ``report`` (the summary table), ``metrics``, ``devices``, ``progress``, ``errors``.

Nothing here imports Typer or DVC's CLI, so every stage can be scripted from Python:
``stages.distill.run(cfg, data, out, data_cfg=...)``.
"""

__version__ = "0.1.0"
