"""Language models: every command for transformers LMs on reasoning tasks and prompt
tables (teacher data with top-k log-probs, selection, distillation, cascades, evaluation),
with generation, scoring, training, the methods table (``methods/``), several teachers
(``teachers/``), in-context distillation (``icd/``) and mixture-of-experts routing (``moe/``)."""
