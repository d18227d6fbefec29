"""LM teachers: several teachers side by side (one vocabulary, the tasks each was trained on)."""
