"""Classifiers: the teacher data, select, distill, cascade and evaluate commands for small
networks on tabular and image tables (digits, user Parquet / CSV), with their models,
training loop and methods table (``methods/``)."""
