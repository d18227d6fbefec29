"""Agent distillation: a code tool the teacher and student call (``sandbox``)."""
