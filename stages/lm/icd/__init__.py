"""In-context distillation: the bank of teacher demonstrations and its retrieval (dense, BM25)."""
