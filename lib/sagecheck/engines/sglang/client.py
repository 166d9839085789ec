"""A client of SGLang's native HTTP API (``sglang/srt/entrypoints/http_server.py``).

* ``POST /generate`` takes ``GenerateReqInput`` (``sglang/srt/managers/io_struct.py``):
  ``input_ids`` (one list or a batch of lists), ``sampling_params``, ``return_logprob``,
  ``logprob_start_len``, ``top_logprobs_num``. The answer (a dict, or a list for a batch)
  has ``meta_info`` with ``input_token_logprobs`` (``[logprob, token_id, text]`` per
  prompt position from ``logprob_start_len``; the first prompt token's logprob is
  ``None``), ``input_top_logprobs`` (per position a list of ``[logprob, token_id, text]``,
  ``None`` for the first), ``output_token_logprobs`` / ``output_top_logprobs`` for the
  generated tokens, ``prompt_tokens`` and ``completion_tokens``.
* ``GET /get_server_info``: the server arguments (``attention_backend``, ``dtype``, ...)
  merged with the scheduler's info (``max_total_num_tokens``, ...) and ``internal_states``.
* ``GET|POST /flush_cache``: empties the radix (prefix) cache between measurements.
* ``POST /start_profile`` takes ``ProfileReq`` (``output_dir``, ``profile_id``, ``activities``, ``with_stack``,
  ``record_shapes``): torch's profiler in every scheduler process until ``POST /stop_profile``, which writes
  ``{output_dir}/{profile_id}-TP-{rank}.trace.json.gz`` (Chrome's trace format) before it answers.
* ``"stream": true``: server-sent events, ``data: {...}`` per chunk (a batch's chunks carry
  their request's ``index`` and ``meta_info.completion_tokens``), then ``data: [DONE]``; an
  error arrives as a chunk ``{"error": {"message": ...}}``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

import numpy as np
import requests

from sagecheck.engines import EngineError


class ClientError(EngineError):
    """A request the server did not answer as it should (HTTP error, no JSON, timeout)."""


class SGLangClient:
    def __init__(self, url: str, timeout_s: float = 600, on_failure: Callable[[], None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.on_failure = on_failure  # e.g. raise the server's log if its process died
        self.session = requests.Session()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            r = self.session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as e:
            if self.on_failure:
                self.on_failure()
            raise ClientError(f"{method} {self.url}{path} failed: {e}") from None
        if r.status_code >= 400:
            raise ClientError(f"{method} {path} answered {r.status_code}: {r.text[:500]}")
        return r

    @staticmethod
    def _json(r: requests.Response, what: str) -> Any:
        """The reply's JSON; :class:`ClientError` in one line where the server sent something else."""
        try:
            return r.json()
        except ValueError as e:
            raise ClientError(f"{what} answered malformed JSON ({e}): {r.text[:120]!r}") from None

    def server_info(self) -> dict[str, Any]:
        return self._json(self._request("GET", "/get_server_info"), "GET /get_server_info")

    def flush_cache(self, wait_s: float = 5.0) -> None:
        """Empty the radix cache. SGLang refuses (400) while a request is still being retired; a request that has just
        returned may be, so the flush is tried again for up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._request("POST", "/flush_cache")
                return
            except ClientError as e:
                if "answered 400" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def start_profile(self, output_dir: str, profile_id: str, activities: tuple[str, ...] = ("CPU", "GPU")) -> None:
        """Torch's profiler on, without Python stacks or shapes (a scheduler idles in a Python loop: with stacks its
        trace grows with wall time, not with the work)."""
        self._request("POST", "/start_profile", json={"output_dir": output_dir, "profile_id": profile_id,
                                                        "activities": list(activities), "with_stack": False,
                                                        "record_shapes": False})

    def stop_profile(self) -> None:
        """Profiler off; SGLang answers once the trace is written."""
        self._request("POST", "/stop_profile")

    def generate(self, input_ids: list[int] | list[list[int]], max_new_tokens: int = 1, **extra: Any) -> Any:
        payload = {
            "input_ids": input_ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
            **extra,
        }
        return self._json(self._request("POST", "/generate", json=payload), "POST /generate")

    # ------------------------------------------------------------------ derived queries

    def input_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        """log p(x_t | x_<t) for t = 1..n-1 of each sequence (teacher forcing)."""
        return [lp for lp, _ in self.scored(batch, 0)]

    def scored(self, batch: list[list[int]], starts: int | list[int]) -> list[tuple[np.ndarray, int]]:
        """Per sequence of one batched request: log p(x_t | x_<t) for t = start+1..n-1, and how many of its tokens the
        server took from its prefix cache (``meta_info.cached_tokens``). ``starts``: ``logprob_start_len``, one for all or
        one per sequence; SGLang reuses at most that many cached tokens (and at most n-1), so a start of 0 always
        prefills cold. The entry at the start itself is left out: after a cached prefix it is not computed."""
        starts = [starts] * len(batch) if isinstance(starts, int) else list(starts)
        out = self.generate(batch, max_new_tokens=1, return_logprob=True,
                            logprob_start_len=starts if len(batch) > 1 else starts[0])
        out = out if isinstance(out, list) else [out]
        result = []
        for seq, start, o in zip(batch, starts, out):
            meta = o["meta_info"]
            values = [e[0] for e in meta["input_token_logprobs"]][1:]
            if len(values) != len(seq) - 1 - start or any(v is None for v in values):
                raise ClientError(f"expected {len(seq) - 1 - start} input logprobs from position {start + 1}, got {len(values)}")
            result.append((np.asarray(values, dtype=np.float64), int(meta.get("cached_tokens") or 0)))
        return result

    def top_logprobs(self, ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k next-token logprobs after each prefix ids[:t+1]: (values, token ids), each [n, k]."""
        o = self.generate(ids, max_new_tokens=1, return_logprob=True, logprob_start_len=0, top_logprobs_num=k)
        meta = o["meta_info"]
        rows = list(meta["input_top_logprobs"][1:]) + [meta["output_top_logprobs"][0]]
        if len(rows) != len(ids) or any(r is None for r in rows):
            raise ClientError(f"expected {len(ids)} positions of top-{k} logprobs")
        values = np.array([[e[0] for e in r[:k]] for r in rows], dtype=np.float64)
        indices = np.array([[e[1] for e in r[:k]] for r in rows], dtype=np.int64)
        return values, indices

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return [tokens for tokens, _ in self.greedy_scored(prompts, max_new_tokens)]

    def greedy_scored(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
        """Per prompt (one batched request): the greedy tokens and each one's log-probability from its decode step."""
        out = self.generate(prompts, max_new_tokens=max_new_tokens, return_logprob=True, logprob_start_len=-1)
        out = out if isinstance(out, list) else [out]
        result = []
        for o in out:
            entries = o["meta_info"]["output_token_logprobs"]
            tokens = list(o["output_ids"]) if "output_ids" in o else [e[1] for e in entries]
            result.append((tokens, [e[0] for e in entries]))
        return result

    def _streamed(self, input_ids: list[int] | list[list[int]], max_new_tokens: int) -> Iterator[tuple[float, dict]]:
        """A streamed greedy ``/generate`` (``ignore_eos``): each chunk as it arrives, with ``time.perf_counter()`` then."""
        payload = {"input_ids": input_ids, "stream": True,
                   "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}
        try:
            with self.session.post(self.url + "/generate", json=payload, stream=True, timeout=self.timeout_s) as r:
                if r.status_code >= 400:
                    raise ClientError(f"POST /generate answered {r.status_code}: {r.text[:500]}")
                for line in r.iter_lines():
                    if not line.startswith(b"data:"):
                        continue
                    body = line[5:].strip()
                    if body == b"[DONE]":
                        break
                    chunk = json.loads(body)
                    if "error" in chunk:
                        raise ClientError(f"POST /generate (streamed) failed: {chunk['error']}")
                    yield time.perf_counter(), chunk
        except requests.RequestException as e:
            if self.on_failure:
                self.on_failure()
            raise ClientError(f"POST {self.url}/generate (streamed) failed: {e}") from None

    def token_times(self, prompt: list[int], max_new_tokens: int) -> list[float]:
        """When each output token of one streamed request arrived, ms from the request (as :meth:`streamed_timing`
        times it): the first is the time to first token, the gaps after it are the decode steps as the client sees
        them. A chunk that carries several tokens gives each of them its arrival time."""
        times: list[float] = []
        t0 = time.perf_counter()
        for now, chunk in self._streamed(prompt, max_new_tokens):
            times.extend([(now - t0) * 1e3] * (int(chunk["meta_info"].get("completion_tokens", 0)) - len(times)))
        if len(times) != max_new_tokens:
            raise ClientError(f"streamed /generate: {len(times)} of {max_new_tokens} tokens arrived")
        return times

    def streamed_timing(self, batch: list[list[int]], max_new_tokens: int) -> tuple[float, float]:
        """(time to the last request's first token, time to the end), ms, of one streamed batch request.

        The method of ``sglang.bench_one_batch_server`` (``run_one_case``): a streamed
        ``/generate``, ``ignore_eos``, timed at the client from the request to the chunk in which
        the last request reports its first completion token, and to the end of the stream.
        """
        first: dict[int, float] = {}
        t0 = time.perf_counter()
        for now, chunk in self._streamed(batch, max_new_tokens):
            if chunk["meta_info"].get("completion_tokens", 0) >= 1:
                first.setdefault(int(chunk.get("index", 0)), now)
        end = time.perf_counter()
        if len(first) != len(batch):
            raise ClientError(f"streamed /generate: {len(first)} of {len(batch)} requests returned a token")
        return (max(first.values()) - t0) * 1e3, (end - t0) * 1e3
