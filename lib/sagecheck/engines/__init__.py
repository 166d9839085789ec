"""Where the model runs: one protocol, two engines (:data:`sagecheck.registry.ENGINES`).

An :class:`Engine` holds one model and gives a :class:`Backend` for each attention implementation it
compares, by label: ``engine.baseline`` and ``engine.candidate`` are the names results are keyed by
(the in-process implementations, or SGLang's ``--attention-backend`` names)::

    engine = sagecheck.engines.create(P)              # hf: loads the weights once; sglang: reaches the run's servers
    with engine.backend(engine.candidate) as b:
        lp = b.token_logprobs([ids])

Every method a measurement calls is declared here. What an engine cannot give is said by its
:attr:`Engine.capabilities` (data, checked with :func:`require`); the optional methods raise
:class:`NotAvailable` with the same words everywhere: "not available on this engine (sglang): ...".
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:  # annotations only: the run's and the report's process read these names without paying torch's import
    import torch

# capabilities: what an engine can give beyond the common methods (teacher-forced logprobs, top-k, greedy generation)
FULL_LOGITS = "full_logits"
HIDDEN_STATES = "hidden_states"
ALLOCATOR_MEMORY = "allocator_memory"
CALL_COUNTS = "call_counts"
STEPWISE = "stepwise"
SERVERS = "servers"
SERVER_MEMORY = "server_memory"
CUDA_GRAPHS = "cuda_graphs"
RADIX_CACHE = "radix_cache"
ACCEPTED_PRECISION = "accepted_precision"

CAPABILITIES = {
    FULL_LOGITS: "next-token distributions over the whole vocabulary",
    HIDDEN_STATES: "per-layer activations (hidden states and attention outputs), and the candidate in chosen layers only",
    ALLOCATOR_MEMORY: "the torch allocator's peak memory per measurement",
    CALL_COUNTS: "the attention calls that reached each implementation, counted per call",
    STEPWISE: "prefill and decode steps driven one by one through an explicit KV cache",
    SERVERS: "servers started with chosen flags (each backend switched on by its command line)",
    SERVER_MEMORY: "the memory a server reports (KV capacity, weights, CUDA graphs) and its processes' GPU memory",
    CUDA_GRAPHS: "decode replayed from captured CUDA graphs",
    RADIX_CACHE: "a prefix cache shared between requests (an extend over cached tokens)",
    ACCEPTED_PRECISION: "the accepted-precision control (the baseline reading keys and values as an FP8 KV cache holds "
                        "them, in every attention call) as a backend of its own",
}


class NotAvailable(NotImplementedError):
    """What this engine cannot give; ``str()`` is the one line a notebook shows."""

    def __init__(self, engine: str, capability: str) -> None:
        self.engine, self.capability = engine, capability
        super().__init__(f"not available on this engine ({engine}): {CAPABILITIES.get(capability, capability)}")


class EngineError(RuntimeError):
    """A part of an engine that could not start or answer (a server that died, a request that failed). ``cause``: one
    line for tables and one-line failures, the engine's own words where it has them; ``str()`` may say more."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause or (message.splitlines()[0] if message else message)


@dataclass
class TopK:
    """Top-k next-token log-probabilities per position: ``values``/``indices`` are [positions, k]."""

    values: np.ndarray
    indices: np.ndarray


@dataclass
class PathRun:
    """Log-probabilities that one code path of an engine produced, and what shows that the path ran (the tokens a
    server took from its prefix cache, the chunks, the attention calls...)."""

    logprobs: list[np.ndarray]
    evidence: dict[str, Any]


@dataclass
class Limits:
    """Where an engine changes code path: the longest prefill it runs in one piece, the largest batch it decodes in a
    captured CUDA graph, its tensor-parallel size (None: it has no such limit, or it is not known)."""

    chunked_prefill_size: int | None = None
    cuda_graph_max_bs: int | None = None
    cuda_graphs: bool = False
    tp: int = 1


@dataclass
class Generated:
    """A greedy continuation and the log-probability of each generated token as the engine produced it (decode)."""

    tokens: list[int]
    logprobs: np.ndarray


class Backend(abc.ABC):
    """One model with one attention implementation, as the measurements use it."""

    engine_name: str = "?"
    label: str  # the name results key it by

    @abc.abstractmethod
    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        """Per sequence: log p(x_t | x_<t) for t = 1..n-1 (teacher forcing, a cold prefill)."""

    @abc.abstractmethod
    def next_token_logprobs(self, ids: list[int], top_k: int | None = None) -> torch.Tensor | TopK:
        """After each prefix ids[:t+1]: the full log-softmax [n, vocab] (float32, :data:`FULL_LOGITS` only), or the top-k."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt."""

    @abc.abstractmethod
    def generate_scored(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generated]:
        """Greedy continuation of each prompt, one batch, with each generated token's log-probability from its decode step."""

    # -------------------------------------------------------------- code paths (10_code_paths)

    def reset_cache(self) -> None:
        """Forget every cached prefix (a server's radix cache); nothing to do where nothing is kept between requests."""

    def limits(self) -> Limits:
        return Limits()

    def counters(self) -> dict[str, int] | None:
        """What the backend counted it ran so far (attention calls, batches by path); None where it counts nothing."""
        return None

    def rank_report(self) -> dict[str, Any] | None:
        """Per tensor-parallel rank, what it holds and ran (a backend that writes such statistics); None otherwise."""
        return None

    def dispatch(self) -> dict[str, Any] | None:
        """Where the backend sends each prefill batch, kernel or baseline kernel, and what that rule came from (sagecheck's
        plugin: ``rule``, its sentence, and ``measured``, the measurement at start: per length, the backend's kernel
        path, the bare kernel and the baseline's kernel, ms per layer); None where the backend has no such rule."""
        return None

    def kernel_phases(self) -> frozenset[str]:
        """Where this backend means to call the attention kernel (``prefill``, ``decode``): a path of another phase is
        served by the baseline's kernel by design, and its kernel calls are not looked for."""
        return frozenset({"prefill", "decode"})

    def census(self) -> dict[str, Any] | None:
        """The kernel calls recorded so far where this backend runs (a :func:`sagecheck.census.snapshot`; a reader diffs
        two around what it ran); None where nothing records them."""
        return None

    def describe(self) -> dict[str, Any]:
        """What serves this label, in the engine's own words (a server: the backend it reports and its settings; in
        process: the implementation)."""
        return {"implementation": self.label}

    def cold_logprobs(self, seqs: list[list[int]]) -> PathRun:
        """Each sequence alone, from an empty cache: log p(x_t | x_<t) for t = 1..n-1."""
        out = []
        for seq in seqs:
            self.reset_cache()
            out += self.token_logprobs([seq])
        return PathRun(out, {})

    def batched_logprobs(self, seqs: list[list[int]]) -> PathRun:
        """The sequences together, as one batch: log p(x_t | x_<t) for t = 1..n-1 of each."""
        self.reset_cache()
        return PathRun(self.token_logprobs(seqs), {"batch": len(seqs)})

    def continuation_logprobs(self, seqs: list[list[int]], starts: list[int]) -> PathRun:
        """The sequences as one batch, each asking for log p(x_t | x_<t) from t = start+1 only, which lets a server
        reuse up to ``start`` tokens from its prefix cache (evidence: ``cached_tokens`` per sequence)."""
        return PathRun([lp[s:] for lp, s in zip(self.token_logprobs(seqs), starts)], {"cached_tokens": [0] * len(seqs)})

    def prefix_logprobs(self, seq: list[int], prefix: int) -> PathRun:
        """After an earlier request left ``seq[:prefix]`` in the cache: log p(x_t | x_<t) for t = prefix+1..n-1,
        computed as an extend over the cached prefix (evidence: ``cached_tokens``)."""
        raise NotAvailable(self.engine_name, "prefix extend")

    def chunked_logprobs(self, seq: list[int], chunk: int) -> PathRun:
        """``seq`` prefilled in chunks of ``chunk`` tokens (a server: of its own chunked-prefill size), each an extend
        over the cache of the earlier ones: log p(x_t | x_<t) for t = 1..n-1."""
        raise NotAvailable(self.engine_name, "chunked prefill")

    # -------------------------------------------------------------- optional: capabilities say which an engine has

    def calls(self) -> dict[str, Any]:
        """:data:`CALL_COUNTS`: the attention calls of this block by implementation and phase, and the fallbacks."""
        raise NotAvailable(self.engine_name, CALL_COUNTS)

    def prefill(self, batch: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """:data:`STEPWISE`: prompts ``[b, n]`` with a fresh KV cache -> (next-token logits [b, vocab], cache)."""
        raise NotAvailable(self.engine_name, STEPWISE)

    def decode_step(self, tokens: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """:data:`STEPWISE`: one token per sequence ``[b]`` through the cache."""
        raise NotAvailable(self.engine_name, STEPWISE)

    def streamed_timing(self, prompts: list[list[int]], decode_tokens: int) -> tuple[float, float]:
        """:data:`SERVERS`: the prompts as one streamed request, timed at the client: (ms to the last request's first
        token, ms to the end)."""
        raise NotAvailable(self.engine_name, SERVERS)

    def memory_report(self) -> dict[str, Any]:
        """:data:`SERVER_MEMORY`: what the server reports of its memory (KV-cache capacity in tokens
        ``max_total_num_tokens``, ``mem_fraction_static``, its start-up split ``weights_GB``, ``kv_cache_GB``,
        ``cuda_graphs_GB``) and the GPU memory its processes hold (``server_gpu_bytes``, NVML; None where unknown)."""
        raise NotAvailable(self.engine_name, SERVER_MEMORY)


class Engine(abc.ABC):
    """One model; a :class:`Backend` per attention implementation, by label."""

    name: str
    capabilities: frozenset[str] = frozenset()
    tokenizer: Any
    baseline: str  # the baseline's label
    candidate: str  # the candidate's label
    control: str | None = None  # :data:`ACCEPTED_PRECISION`: the accepted-precision control's label
    copy: str | None = None  # :data:`SERVERS`: a second baseline, the A/A control of the speed measurements
    max_context: int | None = None  # longest sequence the model takes, where known

    @property
    def pair(self) -> tuple[str, str]:
        return self.baseline, self.candidate

    @abc.abstractmethod
    @contextmanager
    def backend(self, label: str, layers: set[int] | None = None) -> Iterator[Backend]:
        """The backend of ``label`` (``layers``: with :data:`HIDDEN_STATES`, the candidate only in these layers)."""

    @abc.abstractmethod
    def candidate_ran(self) -> str:
        """One sentence on what the candidate ran since the engine started (its calls, or its server's statistics)."""

    @abc.abstractmethod
    def model_config(self) -> Any:
        """The model's transformers config (head counts, vocabulary, context)."""

    def role(self, label: str) -> str | None:
        """What ``label`` is in the run: ``baseline``, ``candidate``, ``baseline_copy``, ``control``; None for another."""
        return {self.baseline: "baseline", self.candidate: "candidate", self.copy: "baseline_copy",
                self.control: "control"}.get(label)

    def flag_checks(self, prompt_ids: list[int], max_new_tokens: int, serving: list[str] = (),
                    refused: list[str] = ()) -> list[dict[str, Any]]:
        """:data:`SERVERS`: 01's checks that the candidate switches on by its flag alone and fails clearly without its
        parts, one row each (``id``, ``check``, ``expected``, ``passed``, what was ``reported``, ``error``)."""
        raise NotAvailable(self.name, SERVERS)

    def current_implementation(self) -> str:
        """:data:`CALL_COUNTS`: the attention implementation the model runs now (one loaded without naming one: its
        default)."""
        raise NotAvailable(self.name, CALL_COUNTS)

    def timed_gpus(self) -> tuple[list[int] | None, str]:
        """The CUDA devices (ordinals as this process numbers them) the engine's timed work runs on, for the GPU clock
        log beside the timings (:mod:`sagecheck.gpu_clocks`); None and why where it cannot say."""
        return None, f"the {self.name} engine does not say which GPU it times"

    # the parameters (dotted paths) whose values this engine's speed and memory figures depend on: runs that differ in
    # one are not compared point by point (``compare``)
    speed_depends_on: tuple[str, ...] = ("model", "revision", "dtype", "engine", "baseline", "candidate", "candidate_phases",
                                         "throughput.decode_tokens")
    memory_depends_on: tuple[str, ...] = ("model", "revision", "dtype", "engine", "baseline", "candidate", "candidate_phases",
                                          "memory.decode_tokens")

    @classmethod
    def facts(cls, params: Any) -> dict[str, Any]:
        """What the run's results say of the engine (recorded with every notebook's environment; the report and
        ``compare`` read them, never the parameters of an engine they would have to know): its name, the labels it
        compares, what it compares in one line (``description``) and as a table (``table``, 00 shows it), its
        tensor-parallel size, whether it serves over HTTP, and the parameters its speed and memory figures depend on."""
        from sagecheck.params import labels

        base, cand = labels(params)
        return {"name": cls.name, "labels": {"baseline": base, "candidate": cand},
                "description": f"baseline `{base}` vs candidate `{cand}`", "table": {"engine": cls.name, "baseline": base,
                                                                                     "candidate": cand},
                "tp": 1, "serves": SERVERS in cls.capabilities,
                "depends_on": {"speed": list(cls.speed_depends_on), "memory": list(cls.memory_depends_on)}}

    @classmethod
    def check_machine(cls, params: Any) -> None:
        """Before any work: what the parameters ask of this machine that only this engine knows (e.g. as many GPUs as
        the tensor-parallel size); :class:`~sagecheck.params.ParamError` in one line otherwise."""

    @classmethod
    def run_servers(cls, params: Any, notebooks: list[str], log_dir: Any, env: dict[str, str] | None = None,
                    progress: bool = False) -> Any:
        """The servers the selected notebooks need, started once for the whole run (a context manager whose
        ``as_dicts()`` the runner hands every notebook), or None where the engine runs in process."""
        return None

    # in-process engines only (:data:`HIDDEN_STATES`, :data:`ALLOCATOR_MEMORY`, :data:`STEPWISE`)
    @property
    def model(self) -> Any:
        raise NotAvailable(self.name, HIDDEN_STATES)

    @property
    def device(self) -> torch.device:
        raise NotAvailable(self.name, STEPWISE)

    @property
    def dtype(self) -> torch.dtype:
        raise NotAvailable(self.name, STEPWISE)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def require(engine: Engine, *capabilities: str) -> None:
    """Raise :class:`NotAvailable` for the first capability ``engine`` lacks."""
    for cap in capabilities:
        if cap not in engine.capabilities:
            raise NotAvailable(engine.name, cap)


def missing(engine_name: str, *capabilities: str) -> list[str]:
    """The capabilities of ``capabilities`` the engine called ``engine_name`` lacks, without creating it."""
    from sagecheck.registry import ENGINES

    have = ENGINES.load(engine_name).capabilities
    return [c for c in capabilities if c not in have]


def facts(params: Any) -> dict[str, Any]:
    """:meth:`Engine.facts` of the engine ``params.engine`` names."""
    from sagecheck.registry import ENGINES

    return ENGINES.load(params.engine).facts(params)


def create(params: Any, **kwargs: Any) -> Engine:
    """The engine chosen by ``params.engine`` (:data:`sagecheck.registry.ENGINES`)."""
    from sagecheck.registry import ENGINES

    return ENGINES.load(params.engine).from_params(params, **kwargs)
