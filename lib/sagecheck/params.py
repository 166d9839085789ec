"""One schema for every parameter of a run.

A run is described by a YAML file (``params/*.yaml``) plus ``-p key=value``
overrides. Everything is validated here, before any notebook starts: an unknown
key, a wrong type or a missing file is reported as one line naming the key, the
value and what is allowed (:class:`ParamError`, exit code 2 in the CLI).

Each notebook receives the common parameters plus its own section, flattened
into plain variables (papermill injects them after the notebook's
``parameters`` cell). The same schema writes the defaults of that cell
(:func:`parameters_cell_source`), so a notebook opened in JupyterLab runs top to
bottom on the embedded default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

BASELINES = ("sdpa", "eager")
# "sdpa-noisy" is a deliberately wrong candidate (a negative control): every
# verdict of the report must catch it.
CANDIDATES = ("sage", "sage-emulated", "sdpa", "eager", "sdpa-noisy")
Phase = Literal["prefill", "decode"]

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")


class ParamError(ValueError):
    """A bad parameter. ``str(err)`` is the one line shown to the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- sections


class SGLangServer(_Section):
    """How the SGLang engine reaches a server (used when ``engine: sglang``)."""

    url: Optional[str] = Field(None, description="attach to a running candidate server instead of starting one")
    baseline_url: Optional[str] = Field(None, description="with url: the running baseline server")
    python: Optional[str] = Field(None, description="interpreter that has sglang installed (default: this one)")
    tp: int = Field(1, ge=1, description="--tp (tensor parallel size)")
    mem_fraction_static: Optional[float] = Field(
        None, gt=0, le=1, description="--mem-fraction-static: with max_total_tokens, every server's (default 0.85, started "
                                      "side by side); without, the first server's, the i-th running at once gets i times it "
                                      "(default 0.283: three servers fit one GPU)")
    max_total_tokens: Optional[int] = Field(None, ge=16, description="--max-total-tokens: the same KV capacity for every server "
                                                                   "(default: what each server's memory fraction leaves)")
    sage_attn_decode: Literal["triton", "sage"] = Field(
        "triton", description="decode of sagecheck's sage_attn backend (SAGE_ATTN_DECODE): the baseline's Triton kernel "
                              "(CUDA graphs) or sageattention's (needs disable_cuda_graph)")
    disable_cuda_graph: bool = Field(False, description="--disable-cuda-graph")
    context_length: Optional[int] = Field(None, ge=16, description="--context-length")
    extra_args: list[str] = Field(default_factory=list, description="more server arguments, passed as given")
    startup_timeout_s: float = Field(600.0, gt=0, description="seconds to wait for the server to become ready")
    request_timeout_s: float = Field(600.0, gt=0)


class EnvironmentParams(_Section):
    pass


class RuntimeFlagParams(_Section):
    implementations: list[str] = Field(
        default_factory=lambda: ["sdpa", "eager", "sage-emulated", "sage"],
        description="implementations to switch on one after the other; unavailable ones must fail clearly",
    )
    sglang_backends: list[str] = Field(default_factory=list, description="SGLang engine: more --attention-backend names that "
                                                                       "must start and generate")
    sglang_refused: list[str] = Field(default_factory=lambda: ["no_such_backend"],
                                      description="SGLang engine: names SGLang must refuse with its own error")
    prompt: str = "To be, or not to be, that is the question:"
    max_new_tokens: int = Field(16, ge=1)


class LogitsParams(_Section):
    text: str = Field("builtin", description="text the prompts are cut from: builtin, wikitext, ptb or a local path")
    n_short: int = Field(8, ge=1, description="number of short prompts")
    short_tokens: int = Field(100, ge=8)
    n_long: int = Field(2, ge=0, description="number of long prompts")
    long_tokens: int = Field(2048, ge=16)
    greedy_tokens: int = Field(32, ge=1, description="greedy continuation length per prompt")
    top_k: int = Field(20, ge=1, description="top-k logprobs (the SGLang engine gives no full distribution)")
    kl_mean_max: float = Field(1e-3, gt=0, description="verdict: mean KL(baseline || candidate) in nats at most")
    top1_min: float = Field(0.97, gt=0, le=1, description="verdict: top-1 agreement at least")


class PerplexityParams(_Section):
    dataset: str = Field("builtin", description="builtin (shipped held-out text), wikitext, ptb, or a local file/folder")
    window: int = Field(512, ge=8, description="tokens per window (model context used)")
    stride: int = Field(256, ge=1, description="new tokens scored per window")
    max_tokens: Optional[int] = Field(None, ge=16, description="score only the first N tokens of the text")
    bootstrap: int = Field(1000, ge=10, description="paired bootstrap resamples over windows")
    delta_max_pct: float = Field(1.0, gt=0, description="verdict: |perplexity delta| in percent at most")

    @field_validator("stride")
    @classmethod
    def _stride_le_window(cls, v: int, info: Any) -> int:
        window = info.data.get("window")
        if window is not None and v > window:
            raise ValueError(f"stride must be at most window ({window})")
        return v


class ThroughputParams(_Section):
    input_lengths: list[int] = Field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    decode_tokens: int = Field(32, ge=1, description="tokens generated per sequence when timing decode")
    repeats: int = Field(5, ge=5, description="timed repeats per point (at least 5)")
    warmup: int = Field(2, ge=1)
    cpu_input_lengths: list[int] = Field(default_factory=lambda: [64, 128], description="sweep used on CPU")
    cpu_batch_sizes: list[int] = Field(default_factory=lambda: [1, 2], description="sweep used on CPU")
    repeat_point: bool = Field(True, description="measure the largest point again at the end (stability check)")
    kernel_time: Literal["all", "repeated", "off"] = Field(
        "repeated", description="GPU busy time of prefill and decode, from one profiled repeat (seconds of host time each): "
                                "at every point, at the repeated (largest) point only, or nowhere")
    stability_max_pct: float = Field(3.0, gt=0, description="verdict: repeated point within this many % (median)")
    aa_control: bool = Field(True, description="SGLang engine: a second baseline server measured interleaved with the others "
                                               "(A/A control: its speedup over the baseline must be 1)")
    aa_max_pct: float = Field(3.0, gt=0, description="verdict: |A/A speedup - 1| (median over points) at most this many %")
    max_batch_tokens: Optional[int] = Field(None, ge=1, description="skip points whose batch x (input + decode tokens) "
                                                                    "exceeds this (recorded as not run)")


class MemoryParams(_Section):
    input_lengths: list[int] = Field(default_factory=lambda: [512, 1024, 2048, 4096])
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4, 16])
    decode_tokens: int = Field(16, ge=1)
    margin_pct: float = Field(5.0, ge=0, description="verdict: candidate peak at most baseline peak plus this margin")


class ActivationDriftParams(_Section):
    text: str = Field("builtin")
    n_prompts: int = Field(2, ge=1)
    tokens: int = Field(512, ge=8)
    position_buckets: int = Field(4, ge=1)
    modes: list[Literal["compounded", "isolated"]] = Field(default_factory=lambda: ["compounded", "isolated"])
    final_cosine_min: float = Field(0.999, gt=0, le=1, description="verdict: cosine of the final hidden state at least")
    final_rel_l2_max: float = Field(0.05, gt=0, description="verdict: relative L2 of the final hidden state at most")


class ContextLengthParams(_Section):
    lengths: list[int] = Field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    max_length: Optional[int] = Field(None, ge=16, description="drop lengths above this")
    trials: int = Field(6, ge=1, description="passkey trials per length and depth")
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    text: str = Field("builtin", description="natural text for the per-position KL and loss")
    short_range: list[int] = Field(default_factory=lambda: [128, 512], description="positions counted as short context")
    long_range: list[int] = Field(default_factory=lambda: [2048, 8192], description="positions counted as long context")
    accuracy_delta_max: float = Field(0.1, ge=0, description="verdict: |candidate - baseline| passkey accuracy per length")
    loss_delta_max: float = Field(0.01, gt=0, description="verdict: |mean loss delta| (nats/token) in the long range")


class KernelParams(_Section):
    seq_lens: list[int] = Field(default_factory=lambda: [1, 17, 128, 333, 1024, 1000, 4096, 8192, 16384, 32768])
    head_dims: list[int] = Field(default_factory=lambda: [64, 128])
    dtypes: list[Literal["float16", "bfloat16"]] = Field(default_factory=lambda: ["float16", "bfloat16"])
    batch: int = Field(1, ge=1)
    heads: int = Field(32, ge=1)
    kv_heads: int = Field(8, ge=1)
    decode_kv_lens: list[int] = Field(default_factory=lambda: [1000, 4096], description="decode shapes: 1 query, this many keys")
    speed_seq_lens: list[int] = Field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768])
    speed_batch: int = Field(4, ge=1)
    speed_heads: int = Field(32, ge=1)
    repeats: int = Field(20, ge=3)
    cpu_max_seq_len: int = Field(1024, ge=1, description="accuracy shapes longer than this are skipped on CPU")
    reference_max_elements: int = Field(2**31, description="above this many score elements the reference runs per head")
    kernel_vs_emulation_max: float = Field(5e-3, gt=0, description="flag shapes whose kernel-vs-emulation rel. L2 exceeds this")
    emulation_vs_reference_max: float = Field(5e-2, gt=0, description="verdict: emulation rel. L2 vs fp64 reference")


class TaskSpec(_Section):
    """One downstream task of 09_tasks."""

    name: str = Field(description="label in the report")
    kind: Literal["multiple_choice", "generate"] = Field(description="multiple_choice: log-likelihood of each choice; "
                                                                     "generate: greedy output, exact match")
    source: str = Field(description="builtin:line_ending, builtin:next_word, mmlu (cais/mmlu), gsm8k (openai/gsm8k), "
                                    "another hub id in the MMLU or GSM8K schema, or a local .json/.jsonl/.csv/.parquet file")
    subset: Optional[str] = Field(None, description="hub configuration (mmlu: all or one subject; gsm8k: main)")
    subjects: Optional[list[str]] = Field(None, description="multiple choice: keep only these subjects")
    split: Optional[str] = Field(None, description="split scored (default: test)")
    fewshot: int = Field(0, ge=0, description="solved examples before each question")
    fewshot_split: Optional[str] = Field(None, description="split the examples come from (mmlu: dev, gsm8k: train; "
                                                           "a local file: its first rows)")
    limit: Optional[int] = Field(None, ge=1, description="score only N questions: the first N, or with sample a seeded random N")
    sample: bool = Field(False, description="with limit: a seeded random sample (MMLU's rows are sorted by subject, "
                                            "so its first N cover only the first subjects)")
    max_new_tokens: int = Field(256, ge=1, description="generate: tokens per answer at most")
    extractor: str = Field("last_number", description="generate: last_number, first_word, first_line or regex:PATTERN")
    stop: list[str] = Field(default_factory=lambda: ["Question:", "\n\n"], description="generate: the output is cut at the first")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith("builtin:") and v not in ("builtin:line_ending", "builtin:next_word"):
            raise ValueError("built-in tasks: builtin:line_ending, builtin:next_word")
        return v

    @field_validator("extractor")
    @classmethod
    def _extractor(cls, v: str) -> str:
        if v not in ("last_number", "first_word", "first_line") and not v.startswith("regex:"):
            raise ValueError("must be last_number, first_word, first_line or regex:PATTERN")
        if v.startswith("regex:"):
            re.compile(v[len("regex:"):])
        return v


def _default_tasks() -> list[TaskSpec]:
    # builtin:next_word is not in the default: the built-in model gets 7% of next words, against 6% for always
    # answering the commonest word, too close to tell anything (the notebook's reference-level check fails)
    return [TaskSpec(name="line ending", kind="multiple_choice", source="builtin:line_ending", limit=200)]


class TasksParams(_Section):
    tasks: list[TaskSpec] = Field(default_factory=_default_tasks, description="the tasks, each scored on both backends")
    batch_size: int = Field(16, ge=1, description="sequences per request")
    bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples over questions")
    cache_dir: Optional[str] = Field(None, description="datasets cache (default: the Hugging Face cache)")
    delta_max_pp: float = Field(2.0, gt=0, description="verdict: |accuracy delta| in percentage points at most")
    mcnemar_alpha: float = Field(0.05, gt=0, lt=1, description="verdict: exact McNemar p-value at least this "
                                                                "(the flips are not significantly one-sided)")

    @field_validator("tasks")
    @classmethod
    def _names(cls, v: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must differ: {names}")
        return v


class SummaryParams(_Section):
    pass


SECTIONS: dict[str, type[_Section]] = {
    "environment": EnvironmentParams,
    "runtime_flag": RuntimeFlagParams,
    "logits": LogitsParams,
    "perplexity": PerplexityParams,
    "throughput": ThroughputParams,
    "memory": MemoryParams,
    "activation_drift": ActivationDriftParams,
    "context_length": ContextLengthParams,
    "kernel": KernelParams,
    "tasks": TasksParams,
    "summary": SummaryParams,
}

# notebook file stem -> section name
NOTEBOOK_SECTIONS = {
    "00_environment": "environment",
    "01_runtime_flag": "runtime_flag",
    "02_logits": "logits",
    "03_perplexity": "perplexity",
    "04_throughput": "throughput",
    "05_memory": "memory",
    "06_activation_drift": "activation_drift",
    "07_context_length": "context_length",
    "08_kernel": "kernel",
    "09_tasks": "tasks",
    "99_summary": "summary",
}


class Params(_Section):
    """All parameters of a run: the common ones, then one section per notebook."""

    title: str = Field("sagecheck report", description="report title")
    model: str = Field("builtin", description="builtin, a Hugging Face model id, a local folder, or random:<config>")
    revision: Optional[str] = Field(None, description="hub revision of the model")
    engine: Literal["hf", "sglang"] = "hf"
    baseline: Literal["sdpa", "eager"] = "sdpa"
    candidate: Literal["sage", "sage-emulated", "sdpa", "eager", "sdpa-noisy"] = "sage-emulated"
    candidate_phases: list[Phase] = Field(default_factory=lambda: ["prefill", "decode"])
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = 0
    sglang_attention_backend: str = Field(
        "sage_attn", description="SGLang --attention-backend name of the candidate (engine: sglang)"
    )
    sglang_baseline_backend: str = Field("triton", description="SGLang --attention-backend name of the baseline "
                                                               "(triton is in every build; fa3 where installed)")
    sglang: SGLangServer = Field(default_factory=SGLangServer)
    notebooks: Optional[list[str]] = Field(None, description="run only these notebooks (names or number prefixes)")

    environment: EnvironmentParams = Field(default_factory=EnvironmentParams)
    runtime_flag: RuntimeFlagParams = Field(default_factory=RuntimeFlagParams)
    logits: LogitsParams = Field(default_factory=LogitsParams)
    perplexity: PerplexityParams = Field(default_factory=PerplexityParams)
    throughput: ThroughputParams = Field(default_factory=ThroughputParams)
    memory: MemoryParams = Field(default_factory=MemoryParams)
    activation_drift: ActivationDriftParams = Field(default_factory=ActivationDriftParams)
    context_length: ContextLengthParams = Field(default_factory=ContextLengthParams)
    kernel: KernelParams = Field(default_factory=KernelParams)
    tasks: TasksParams = Field(default_factory=TasksParams)
    summary: SummaryParams = Field(default_factory=SummaryParams)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("candidate_phases")
    @classmethod
    def _phases(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one phase: prefill, decode")
        return list(dict.fromkeys(v))


COMMON_KEYS = tuple(k for k in Params.model_fields if k not in SECTIONS)
# keys every notebook gets from the runner on top of its parameters
RUN_KEYS = ("run_dir", "sglang_servers")


# --------------------------------------------------------------------------- loading


def _did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_error(err: dict, data: dict, origin: str) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    where = f" in {origin}" if origin else ""
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = Params
        for part in loc[:-1]:
            if part not in model.model_fields:  # a list index: the model of the list's items is already chosen
                continue
            ann = model.model_fields[part].annotation
            item = (getattr(ann, "__args__", None) or [None])[0]  # list[Model] -> Model
            for cand in (ann, item):
                if isinstance(cand, type) and issubclass(cand, BaseModel):
                    model = cand
                    break
        allowed = sorted(model.model_fields)
        scope = ".".join(loc[:-1]) or "the top level"
        return (
            f"unknown parameter '{key}'{where}{_did_you_mean(loc[-1], allowed)}; "
            f"allowed at {scope}: {', '.join(allowed)}"
        )
    value = err.get("input")
    return f"parameter '{key}'{where} = {value!r}: {err['msg']}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.sub=value`` -> (["key", "sub"], value parsed as YAML)."""
    if "=" not in text:
        raise ParamError(f"override '{text}' must look like key=value (e.g. -p logits.n_short=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ParamError(f"override '{text}': '{key}' is not a parameter name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def load_params(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read a params file, apply ``key=value`` overrides, validate everything."""
    data: dict[str, Any] = {}
    origin = ""
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ParamError(f"params file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParamError(f"params file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ParamError(f"params file {p} must hold a mapping of parameters, not {type(loaded).__name__}")
        data = loaded
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        raise ParamError(_format_error(e.errors()[0], data, origin)) from None
    check_paths(params, base=Path(path).parent if path else Path.cwd())
    return params


# --------------------------------------------------------------------------- paths

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_HUB_DATASETS = ("builtin", "wikitext", "ptb")  # anything else must be a local file or folder


def looks_like_path(value: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is a local path."""
    if value.startswith((".", "/", "~")) or Path(value).exists():
        return True
    return not _HUB_ID.fullmatch(value)


def _check_existing(key: str, value: str, base: Path) -> Path:
    """The existing local path ``value`` (as given, else relative to ``base``), or ParamError."""
    candidate = Path(os.path.expanduser(value))
    if not candidate.is_absolute() and not candidate.exists():
        candidate = base / candidate
    if not candidate.exists():
        raise ParamError(f"parameter '{key}' = {value!r}: local path does not exist")
    return candidate


def check_paths(params: Params, base: Path) -> None:
    """Missing local files fail here, before any notebook starts."""
    model = params.model
    if model.startswith("random:"):
        from sagecheck.models import random_config_path

        try:
            random_config_path(model.split(":", 1)[1])
        except FileNotFoundError as e:
            raise ParamError(f"parameter 'model' = {model!r}: {e}") from None
    elif model != "builtin" and looks_like_path(model):
        params.model = str(_check_existing("model", model, base).resolve())
    # local paths become absolute: notebooks run in their own folder, not where the run was started
    for section, field in (("logits", "text"), ("perplexity", "dataset"), ("activation_drift", "text"), ("context_length", "text")):
        value = getattr(getattr(params, section), field)
        if value not in _HUB_DATASETS:
            setattr(getattr(params, section), field, str(_check_existing(f"{section}.{field}", value, base).resolve()))
    for i, task in enumerate(params.tasks.tasks):
        if Path(task.source).suffix in (".json", ".jsonl", ".csv", ".parquet"):
            # absolute, because notebooks run in their own folder
            task.source = str(_check_existing(f"tasks.tasks[{i}].source", task.source, base).resolve())
    if params.sglang.python:
        _check_existing("sglang.python", params.sglang.python, base)


# --------------------------------------------------------------------------- notebooks


def section_for(notebook: str) -> str | None:
    return NOTEBOOK_SECTIONS.get(Path(notebook).stem)


def notebook_parameters(params: Params, notebook: str) -> dict[str, Any]:
    """The flat variables a notebook receives: common keys plus its own section."""
    dumped = params.model_dump(mode="json")
    flat = {k: dumped[k] for k in COMMON_KEYS}
    section = section_for(notebook)
    if section:
        flat.update(dumped[section])
    return flat


def from_notebook(notebook: str, namespace: dict[str, Any]) -> Params:
    """Rebuild validated :class:`Params` from a notebook's variables.

    A notebook calls ``P = sagecheck.params.from_notebook("02_logits", globals())``
    after its parameters cell. Invalid values raise :class:`ParamError`.
    """
    data: dict[str, Any] = {k: namespace[k] for k in COMMON_KEYS if k in namespace}
    section = section_for(notebook)
    if section:
        fields = SECTIONS[section].model_fields
        data[section] = {k: namespace[k] for k in fields if k in namespace}
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        raise ParamError(_format_error(e.errors()[0], data, notebook)) from None
    check_paths(params, base=Path.cwd())
    return params


def params_hash(flat: dict[str, Any]) -> str:
    """Stable hash of a notebook's parameters (run bookkeeping keys excluded)."""
    from sagecheck import __version__

    payload = {k: v for k, v in flat.items() if k not in RUN_KEYS}
    payload["__sagecheck__"] = __version__
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def parameters_cell_source(notebook: str) -> str:
    """The committed ``parameters`` cell of a notebook: the schema's defaults."""
    flat = notebook_parameters(Params(), notebook)
    lines = [
        "# Parameters: defaults from sagecheck.params (the embedded default).",
        "# `python -m sagecheck run` injects the values of the run below this cell.",
    ]
    for key, value in flat.items():
        lines.append(f"{key} = {value!r}")
    lines.append('run_dir = ""  # empty: outputs/interactive in the project root')
    lines.append("sglang_servers = {}  # the run's SGLang servers (the runner fills it); empty: the notebook starts its own")
    return "\n".join(lines)


def backend_names(p: Any) -> tuple[str, str]:
    """(baseline, candidate) as the report names them: SGLang's --attention-backend names on the SGLang engine,
    the in-process implementations otherwise. ``p``: a notebook's ``P`` or a run's parameters as a dict."""
    get = p.get if isinstance(p, dict) else (lambda key, default=None: getattr(p, key, default))
    if get("engine") == "sglang":
        return get("sglang_baseline_backend", "baseline"), get("sglang_attention_backend", "candidate")
    return get("baseline", "baseline"), get("candidate", "candidate")


def resolve_run_dir(run_dir: str) -> Path:
    """Where a notebook writes results when run by hand (``run_dir`` empty)."""
    if run_dir:
        return Path(run_dir)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder / "outputs" / "interactive"
    return here / "outputs" / "interactive"


class NotebookParams:
    """A notebook's view of the parameters: its own section's keys and the common keys as attributes.

    ``P.kl_mean_max`` reads the section, ``P.model`` the common part; ``P.all`` is the full :class:`Params`.
    """

    def __init__(self, params: Params, notebook: str, servers: dict[str, Any] | None = None) -> None:
        self.all = params
        self.notebook = notebook
        section = section_for(notebook)
        self.section = getattr(params, section) if section else None
        self.servers = dict(servers or {})  # the run's SGLang servers by role (run key sglang_servers)

    def __getattr__(self, name: str) -> Any:
        section = self.__dict__.get("section")
        if section is not None and name in type(section).model_fields:
            return getattr(section, name)
        return getattr(self.__dict__["all"], name)

    def with_common(self, **changes: Any) -> "NotebookParams":
        """The same view with common keys changed (e.g. ``engine="hf"``)."""
        return NotebookParams(self.all.model_copy(update=changes), self.notebook, self.servers)
