"""Diffusion teachers and their few-step students (METHODS.md section 7).

- ``models``: the networks (a time-conditioned MLP for 2-D points, diffusers' ``UNet2DModel``)
- ``schedule``: the teacher's discrete noise schedule and prediction-type conversions
- ``generator``: generator folders on disk (diffusers layout) and loading them
- ``pipeline``: a diffusers pipeline class for the MLP folders
- ``sampling``: ODE solvers (ddim, euler, heun), consistency sampling, hybrid first step
- ``training``: the resumable epoch loop and the weight EMA shared by the methods
- ``train_denoise``: ``distill --method denoise`` (a diffusion teacher from data)
- ``consistency``: ``distill --method consistency-distill`` (CD / LCM)
- ``methods``: the name -> method table (light: ``--help`` lists it without diffusers)
- ``distill``: the diffusion branch of ``distil distill``
- ``teacher_data``: ``generate-teacher-data`` for generators (trajectories + samples)
"""
