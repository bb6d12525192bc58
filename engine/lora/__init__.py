"""Multi-LoRA serving: adapter files, compute slots, the per-batch LoRA backend."""
