"""No device work of the census's writer thread while a CUDA graph is being captured (sagecheck.cuda_capture): the
tracking of captures on a stand-in graph class, the census leaving device calls unread during a capture and reading them
after, and on a GPU the failure it prevents (a copy to the host from another thread breaks a capture in global mode)."""

from __future__ import annotations

import threading

import pytest
import torch

from sagecheck import census, cuda_capture


class FakeGraph:
    """A graph class with the two methods torch.cuda.CUDAGraph has, logging what ran."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def capture_begin(self, *args, **kwargs):
        self.log.append("begin")

    def capture_end(self):
        self.log.append("end")


def tracked_class():
    class Graph(FakeGraph):
        pass

    assert cuda_capture.track(Graph) and cuda_capture.track(Graph)  # once, however often asked
    return Graph


def test_a_tracked_capture_counts_itself_and_waits_for_device_work_under_way():
    graph = tracked_class()([])
    assert cuda_capture.underway() == 0
    graph.capture_begin()
    with cuda_capture.outside_capture() as free:
        assert not free and cuda_capture.underway() == 1
    graph.capture_end()
    assert graph.log == ["begin", "end"] and cuda_capture.underway() == 0

    # another thread's capture waits while device work is under way, and begins once it is done
    began = threading.Event()
    thread = threading.Thread(target=lambda: (graph.capture_begin(), began.set()))
    with cuda_capture.outside_capture() as free:
        assert free
        thread.start()
        assert not began.wait(0.3)
    assert began.wait(5)
    thread.join()
    graph.capture_end()
    assert cuda_capture.underway() == 0


def test_a_capture_that_fails_to_begin_is_not_counted():
    class Failing(FakeGraph):
        def capture_begin(self, *args, **kwargs):
            raise RuntimeError("no capture")

    cuda_capture.track(Failing)
    with pytest.raises(RuntimeError):
        Failing([]).capture_begin()
    assert cuda_capture.underway() == 0


def record_device_call(c: census.Census) -> None:
    c.record("sageattn_varlen", "k", causal=True, sm_scale=None, head_dim=64, q_heads=8, kv_heads=2, dtype="float16",
             layout="varlen", q_lens=torch.tensor([5, 70]), k_lens=torch.tensor([5, 200]))


def test_the_census_leaves_device_calls_unread_during_a_capture_and_reads_them_after(monkeypatch):
    classified = []
    real = census.classify_pending
    monkeypatch.setattr(census, "classify_pending", lambda *a: classified.append(1) or real(*a))
    c = census.Census()
    record_device_call(c)
    graph = tracked_class()([])
    graph.capture_begin()
    (entry,) = c.snapshot().values()
    assert classified == [] and c.has_pending()  # counted as a call, its sequences not read
    assert entry["calls"] == 1 and entry["k_classes"] == {}
    graph.capture_end()
    (entry,) = c.snapshot().values()
    assert classified == [1] and not c.has_pending()
    assert entry["k_classes"] == {"2-15 partial": 1, "128-511 partial": 1} and entry["causal_short_q"] == 1


def test_the_writer_writes_again_what_a_capture_left_unread(tmp_path, monkeypatch):
    """With no call since, the writer still writes once the capture ends: the file gets the classes."""
    import json
    import time

    c = census.Census()
    monkeypatch.setattr(census, "CENSUS", c)
    monkeypatch.setattr(census, "snapshot", c.snapshot)
    record_device_call(c)
    graph = tracked_class()([])
    graph.capture_begin()
    path = tmp_path / "census.json"
    census.start_writer(path, 0.02)
    deadline = time.time() + 5
    while not path.exists() and time.time() < deadline:
        time.sleep(0.02)
    (entry,) = json.loads(path.read_text())["census"].values()
    assert entry["calls"] == 1 and entry["k_classes"] == {}
    graph.capture_end()
    while time.time() < deadline and not json.loads(path.read_text())["census"].popitem()[1]["k_classes"]:
        time.sleep(0.02)
    (entry,) = json.loads(path.read_text())["census"].values()
    assert entry["k_classes"] == {"2-15 partial": 1, "128-511 partial": 1}


def read_from_another_thread_during_a_capture(read) -> BaseException | None:
    """A CUDA graph captured in global mode while another thread runs ``read``; the capture's error, if any."""
    x = torch.ones(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    done = threading.Event()
    try:
        with torch.cuda.graph(graph, capture_error_mode="global"):
            y = x * 2
            thread = threading.Thread(target=lambda: (read(), done.set()))
            thread.start()
            thread.join(30)
            y = y + 1
        graph.replay()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - what the capture raised is the result
        return e
    finally:
        torch.cuda.synchronize()
    assert done.is_set()
    return None


@pytest.mark.gpu
def test_on_a_gpu_the_census_read_during_a_capture_leaves_it_whole_where_a_bare_read_breaks_it():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cuda_capture.track()
    c = census.Census()
    c.record("sageattn_varlen", "k", causal=False, sm_scale=None, head_dim=64, q_heads=8, kv_heads=2, dtype="float16",
             layout="varlen", q_lens=torch.tensor([3, 70], device="cuda"), k_lens=torch.tensor([64, 200], device="cuda"))
    pending = [p for counts in c._counts.values() for p in counts.pending]
    # the control: the census's reading of device counts, done bare from another thread, breaks the capture
    errors: list[BaseException] = []

    def bare():
        try:
            census.classify_pending(pending, False)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    assert read_from_another_thread_during_a_capture(bare) is not None or errors
    # the census's own read waits for the capture to end, and the capture completes
    assert read_from_another_thread_during_a_capture(c.snapshot) is None
    (entry,) = c.snapshot().values()
    assert entry["k_classes"] == {"64-127": 1, "128-511 partial": 1}


def test_recording_and_reading_from_two_threads_never_wait_on_each_other(monkeypatch):
    """A call that makes the census read its waiting device calls (``PENDING_CALLS`` reached) and a reader on another
    thread take the capture lock and the census's lock in the same order: both threads finish."""
    monkeypatch.setattr(census, "PENDING_CALLS", 1)
    c = census.Census()
    stop = threading.Event()

    def record():
        for _ in range(3000):
            record_device_call(c)

    def read():
        while not stop.is_set():
            c.snapshot()

    reader = threading.Thread(target=read, daemon=True)
    recorder = threading.Thread(target=record, daemon=True)
    reader.start()
    recorder.start()
    recorder.join(30)
    stop.set()
    reader.join(30)
    assert not recorder.is_alive() and not reader.is_alive()
    (entry,) = c.snapshot().values()
    assert entry["calls"] == 3000 and entry["k_classes"] == {"2-15 partial": 3000, "128-511 partial": 3000}
