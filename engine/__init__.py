"""coserve engine: the process that owns the model, KV cache and scheduler."""
