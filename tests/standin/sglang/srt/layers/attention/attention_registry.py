"""STAND-IN for ``sglang.srt.layers.attention.attention_registry``: ``register_attention_backend(name)(factory)``."""

ATTENTION_BACKENDS = {}


def register_attention_backend(name):
    def decorator(fn):
        ATTENTION_BACKENDS[name] = fn
        return fn

    return decorator
