"""Diffusion generators: teachers trained from data and their few-step students (METHODS.md
section 7). Generators support ``generate-teacher-data``, ``distill`` and ``evaluate``; the
``select`` and ``cascade`` routers refuse them.

Commands (each ``run`` is what ``stages.<command>`` calls):

- ``teacher_data``: ``generate-teacher-data`` for generators (sampling trajectories + final samples)
- ``distill``: ``distil distill`` for generators (a method from ``methods/``, saved as a generator folder)
- ``evaluate``: ``distil evaluate`` for generators (every model at every step count against the data)

Shared by the commands:

- ``data``: generator data (2-D toys, ``digits-images``, diffusion teacher data) and the
  teacher-data reader (``read_trajectories``, ``read_final_samples``)
- ``models``: the networks (a time-conditioned MLP for 2-D points, diffusers' ``UNet2DModel``)
- ``schedule``: the teacher's discrete noise schedule and prediction-type conversions; Karras levels
- ``generator``: generator folders on disk (diffusers layout) and loading them
- ``pipeline``: a diffusers pipeline class for the MLP folders
- ``sampling``: ODE solvers (ddim, euler, heun), consistency sampling, hybrid first step
- ``training``: the resumable epoch loop and the weight EMA shared by the methods
- ``students``: what the students of a teacher share (teacher checks, init, schedulers, paired error)

``methods/``: ``__init__`` holds the name -> method table (light: ``--help`` lists it
without diffusers), one module per method:

- ``denoise``: ``--method denoise`` (a diffusion teacher from data)
- ``consistency``: ``--method consistency-distill`` (CD / LCM)
- ``multistep``: ``--method multistep`` (multistep / segmented consistency: MCM, MLCM, Hyper-SD)
- ``consistency_train``: ``--method consistency-train`` (iCT, no teacher; Karras levels)
- ``trajectory``: ``--method trajectory`` (TBCM: image-free, pairs on teacher trajectories)
- ``progressive``: ``--method progressive`` (Salimans & Ho: halve the DDIM steps per round)

``metrics/``: pure functions of sample arrays that ``evaluate`` calls (``distances``,
``toy_modes``, ``digits_features``, ``plots``, ``timing``).
"""
