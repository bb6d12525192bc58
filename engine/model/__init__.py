"""Model code: the Llama family on a flat token batch with a paged KV cache."""
