"""Classifiers: small networks on tabular and image tables (digits, user Parquet / CSV), and
all five commands for them.

Commands (each ``run`` is what ``stages.<command>`` calls):

- ``teacher_data``: ``generate-teacher-data`` (a teacher's full logits per row)
- ``select``: ``distil select`` (filter and weight teacher data; strategies in ``selectors``)
- ``distill``: ``distil distill`` (train a student, or a teacher with ``--method ce``)
- ``cascade``: ``distil cascade`` (student when confident, teacher otherwise; calibrated on dev)
- ``evaluate``: ``distil evaluate`` for classifier models and cascades

Shared by the commands:

- ``models``: the networks, saved as ``config.json`` + ``model.safetensors``, and loading them
- ``training``: the resumable training loop (``fit``) and the ``Context`` a method gets
- ``methods/``: the name -> method table (``__init__``) and the methods, by family
  (``logit``, ``self_distill``, ``representation``, ``experts``; ``common`` for what they share)
"""
