"""Diffusion teachers and their few-step students (METHODS.md section 7).

- ``models``: the networks (a time-conditioned MLP for 2-D points, diffusers' ``UNet2DModel``)
- ``schedule``: the teacher's discrete noise schedule and prediction-type conversions
- ``generator``: generator folders on disk (diffusers layout) and loading them
- ``pipeline``: a diffusers pipeline class for the MLP folders
- ``sampling``: ODE solvers (ddim, euler, heun), consistency sampling, hybrid first step
- ``training``: the resumable epoch loop and the weight EMA shared by the methods
- ``train_denoise``: ``distill --method denoise`` (a diffusion teacher from data)
- ``students``: what the students of a teacher share (teacher checks, init, schedulers, paired error)
- ``consistency``: ``distill --method consistency-distill`` (CD / LCM)
- ``multistep``: ``distill --method multistep`` (multistep / segmented consistency: MCM, MLCM, Hyper-SD)
- ``consistency_train``: ``distill --method consistency-train`` (iCT, no teacher; Karras levels)
- ``trajectory``: ``distill --method trajectory`` (TBCM: image-free, pairs on teacher trajectories)
- ``progressive``: ``distill --method progressive`` (Salimans & Ho: halve the DDIM steps per round)
- ``methods``: the name -> method table (light: ``--help`` lists it without diffusers)
- ``distill``: the diffusion branch of ``distil distill``
- ``teacher_data``: ``generate-teacher-data`` for generators (trajectories + samples)
"""
