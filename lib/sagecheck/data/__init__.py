"""Text corpora, prompt sets and passkey-retrieval tasks."""
