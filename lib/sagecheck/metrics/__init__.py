"""Statistics the notebooks report: logits, perplexity, drift, timing, memory."""
