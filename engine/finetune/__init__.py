"""Token-level LoRA finetuning inside the engine iterations (after FlexLLM)."""
