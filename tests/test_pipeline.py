"""darkconv.pipeline.stream_detect: order, bounded queues, padding of fixed batches, errors, shutdown.

The runner is the real yolov3-tiny on onnxruntime; the reference for every detection is the plain
sequential path (``detect_arrays``, one image at a time).
"""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from darkconv.errors import DarkconvError, InferenceError
from darkconv.pipeline import Timings, batch_limits, detect_arrays, open_runner, stream_detect
from darkconv.preprocess import preprocess


@dataclass
class Frame:
    """What stream_detect needs of darkconv.sources.Frame: index, name, image (HxWx3 uint8 RGB)."""

    index: int
    name: str
    image: np.ndarray


class SlowFrame(Frame):
    """A frame whose image takes a random time to arrive (read in a preprocessing worker): later frames
    often finish preprocessing before earlier ones."""

    @property
    def image(self):
        time.sleep(random.uniform(0, 0.02))
        return self._image

    @image.setter
    def image(self, value):
        self._image = value


def stream_threads():
    return [t for t in threading.enumerate() if t.name.startswith("darkconv-stream")]


def same(a, b):
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)


@pytest.fixture(scope="module")
def runner(default_onnx):
    with open_runner(default_onnx, threads=1) as r:
        yield r


@pytest.fixture(scope="module")
def images(sample_images):
    """The sample images and a few crops of them (varied sizes, including a tiny one)."""
    _, ims = sample_images
    crops = [ims[0][:97, :301], ims[1][50:, 13:], ims[2][:40, :40]]
    return list(ims) + crops


@pytest.fixture(scope="module")
def reference(runner, images):
    return [detect_arrays(runner, [im])[0] for im in images]


def test_results_in_input_order_and_equal_to_sequential(runner, images, reference):
    random.seed(3)
    frames = [SlowFrame(i, f"f{i}", im) for i, im in enumerate(images)] * 2
    timings = Timings()
    out = list(stream_detect(runner, iter(frames), batch=3, workers=3, timings=timings))
    assert [f.index for f, _ in out] == [f.index for f in frames]
    for (f, det) in out:
        assert not isinstance(det, BaseException), det
        same(det, reference[f.index])
    assert timings.images == len(frames) and timings.inference > 0 and timings.preprocess > 0
    assert not stream_threads()


def endless(images, pulled):
    """An endless source of small frames; ``pulled`` gets the index of every frame taken from it."""
    i = 0
    while True:
        pulled.append(i)
        yield Frame(i, str(i), images[i % 3][:64, :80])
        i += 1


def test_bounded_with_endless_source_and_slow_consumer(runner, images):
    pulled = []
    gen = stream_detect(runner, endless(images, pulled), batch=2, queue_size=4, workers=2)
    seen = 0
    for frame, det in gen:
        assert frame.index == seen and not isinstance(det, BaseException)
        seen += 1
        time.sleep(0.05)          # a slow consumer: the stages must stop pulling frames
        if seen == 12:
            break
    ahead = len(pulled) - seen
    gen.close()
    # per stage at most queue_size frames, plus one batch in each of the three threads and one being built
    assert ahead <= 3 * 4 + 4 * 2, ahead
    assert not stream_threads()
    n = len(pulled)
    time.sleep(0.1)
    assert len(pulled) == n       # nothing runs after close()


def test_fixed_batch_onnx_pads_the_last_batch(default_torch_model, images, reference, tmp_path):
    from darkconv.export.onnx import export_onnx

    path = export_onnx(default_torch_model, tmp_path / "b4.onnx", batch=4)     # = convert --batch 4
    five = images[:5]
    with open_runner(path, threads=1) as r4:
        assert batch_limits(r4) == (4, 4)
        with pytest.raises(DarkconvError, match="fixed batch of 4"):       # what the padding avoids
            r4.infer(np.zeros((1, 3, 416, 416), np.float32))
        out = list(stream_detect(r4, [Frame(i, str(i), im) for i, im in enumerate(five)], batch=4))
        with pytest.raises(DarkconvError, match="at most 4"):
            stream_detect(r4, [], batch=8)
    assert [f.index for f, _ in out] == [0, 1, 2, 3, 4]                     # padding dropped
    for f, det in out:
        same(det, reference[f.index])


class FailingRunner:
    """The real runner, except that the calls numbered in ``fail`` raise InferenceError (a server that died)."""

    def __init__(self, runner, fail):
        self.runner, self.fail, self.calls = runner, set(fail), 0
        self.spec = runner.spec

    def describe(self):
        return "failing"

    def infer(self, batch):
        self.calls += 1
        if self.calls in self.fail:
            raise InferenceError("the server went away")
        return self.runner.infer(batch)


def test_inference_error_fails_its_batch_only(runner, images, reference):
    frames = [Frame(i, str(i), im) for i, im in enumerate(images)]          # 8 frames, batches of 3
    out = list(stream_detect(FailingRunner(runner, fail={2}), frames, batch=3))
    assert [f.index for f, _ in out] == list(range(len(images)))
    for f, det in out:
        if f.index in (3, 4, 5):
            assert isinstance(det, InferenceError)
        else:
            same(det, reference[f.index])


def test_bad_frame_gets_its_error_and_source_error_is_raised_in_order(runner, images, reference):
    frames = [Frame(0, "a", images[0]), Frame(1, "bad", np.zeros((5, 5), np.float32)), Frame(2, "c", images[1])]
    out = list(stream_detect(runner, frames, batch=2))
    assert isinstance(out[1][1], ValueError)
    same(out[0][1], reference[0])
    same(out[2][1], reference[1])

    def broken():
        yield Frame(0, "a", images[0])
        yield Frame(1, "b", images[1])
        raise OSError("the camera went away")

    got = []
    with pytest.raises(OSError, match="camera"):
        for f, det in stream_detect(runner, broken(), batch=1):
            got.append(f.index)
    assert got == [0, 1]
    assert not stream_threads()


def test_close_mid_stream_and_ctrl_c_join_every_thread(runner, images):
    frames = [Frame(i, str(i), images[i % len(images)]) for i in range(40)]
    gen = stream_detect(runner, iter(frames), batch=2, workers=2)
    assert next(gen)[0].index == 0
    assert next(gen)[0].index == 1
    assert stream_threads()
    gen.close()
    assert not stream_threads()

    class Slow:
        spec = runner.spec

        def describe(self):
            return "slow"

        def infer(self, batch):
            time.sleep(0.3)
            return runner.infer(batch)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with SIGINT ignored
    try:
        threading.Timer(0.5, lambda: __import__("_thread").interrupt_main()).start()
        with pytest.raises(KeyboardInterrupt):
            for _ in stream_detect(Slow(), iter(frames), batch=1):
                pass
    finally:
        signal.signal(signal.SIGINT, old)
    assert not stream_threads()


class Recording:
    """A real runner that takes ``concurrency`` calls at once, each held a random time: records how many
    calls ran at the same moment (the pipeline must use the lanes and still give results in input order)."""

    def __init__(self, runner, fail=None):
        self.runner, self.spec, self.concurrency = runner, runner.spec, runner.concurrency
        self.active = self.most = self.calls = 0
        self.fail = fail                          # fail(batch) -> True: this call raises InferenceError
        self.lock = threading.Lock()

    def describe(self):
        return "recording"

    def infer(self, batch):
        with self.lock:
            self.calls += 1
            call = self.calls
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(random.uniform(0.005, 0.04))  # a later batch often finishes first
            if self.fail is not None and self.fail(batch):
                raise InferenceError("the server went away")
            return self.runner.infer(batch)
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.parametrize("lanes", [1, 3])
def test_lanes_infer_batches_at_once_results_in_input_order(default_onnx, images, reference, lanes):
    random.seed(lanes)
    with open_runner(default_onnx, threads=lanes, lanes=lanes) as r:
        assert r.concurrency == lanes and r.describe().endswith(f"{lanes} lanes)" if lanes > 1 else "Provider)")
        rec = Recording(r)
        frames = [SlowFrame(i, f"f{i}", im) for i, im in enumerate(images)] * 3
        t = Timings()
        out = list(stream_detect(rec, iter(frames), batch=2, workers=2, timings=t))
        # busy time: the wall time with any call running; calls overlap only with lanes
        assert 0 < t.inference_busy <= t.inference * 1.02 and (t.inference_busy < 0.9 * t.inference) == (lanes > 1)
        assert [f.index for f, _ in out] == [f.index for f in frames]
        for f, det in out:
            same(det, reference[f.index])        # a single-threaded call gives the same numbers
        assert rec.most == lanes
        # the batch of frames 2 and 3 fails alone, the others go on (known by its pixels: with lanes, calls start
        # in any order)
        frame2 = preprocess(images[2], (r.spec.width, r.spec.height), r.spec.letter_box)
        failing = Recording(r, fail=lambda batch: np.array_equal(batch[0], frame2))
        out = list(stream_detect(failing, [Frame(i, str(i), im) for i, im in enumerate(images)], batch=2))
        assert [f.index for f, _ in out] == list(range(len(images)))
        for f, det in out:
            if f.index in (2, 3):
                assert isinstance(det, InferenceError)
            else:
                same(det, reference[f.index])
    assert not stream_threads()


def test_lanes_bounded_and_closed_mid_stream(default_onnx, images):
    with open_runner(default_onnx, threads=2, lanes=2) as r:
        pulled = []
        gen = stream_detect(r, endless(images, pulled), batch=2, queue_size=4, workers=2)
        for seen, (frame, det) in enumerate(gen, 1):
            assert not isinstance(det, BaseException)
            time.sleep(0.05)
            if seen == 12:
                break
        assert len(pulled) - seen <= 3 * 4 + 4 * 2 + 2 * 2, len(pulled) - seen   # + a batch per extra lane
        gen.close()
        assert not stream_threads()


def test_lanes_option_checked(default_onnx, default_model):
    with pytest.raises(DarkconvError, match="--lanes applies to the onnxruntime backend, not torch"):
        open_runner(default_model.cfg, default_model.weights, "torch", lanes=2)
    with pytest.raises(DarkconvError, match="--lanes must be >= 1"):
        open_runner(default_onnx, lanes=-1)
    from darkconv.pipeline import default_lanes

    with pytest.raises(DarkconvError, match="--lanes must be >= 1"):
        open_runner(default_onnx, lanes=0)
    assert default_lanes("torch") == 1 and default_lanes("ort", live=True) == 1
    assert default_lanes("onnxruntime", threads=2) == 2 and default_lanes("onnxruntime", threads=4) == 4
    assert default_lanes("onnxruntime", threads=16) == 1      # the calls would share one session's pool
    assert default_lanes("onnxruntime", threads=4, batches=1) == 1 and default_lanes("ort", threads=3, batches=2) == 2


class Counting:
    """A real runner whose calls take at least 30 ms and are counted."""

    def __init__(self, runner):
        self.runner, self.spec, self.concurrency, self.calls = runner, runner.spec, 1, 0

    def describe(self):
        return "counting"

    def infer(self, batch):
        time.sleep(0.03)
        out = self.runner.infer(batch)
        self.calls += 1
        return out


class Pulls:
    """A source of small frames that records, at every frame taken, how many inference calls had finished."""

    def __init__(self, images, runner, n, live=False):
        self.images, self.runner, self.n, self.live, self.at = images, runner, n, live, []

    def __iter__(self):
        for i in range(self.n):
            self.at.append(self.runner.calls)
            yield Frame(i, str(i), self.images[i % 3][:64, :80])


@pytest.mark.parametrize("live", [False, True])
def test_files_refill_the_queue_in_bursts_a_live_source_at_once(runner, images, live):
    """Once the queue is full, frames from files are taken in bursts (half the queue at a time: the preprocessing
    worker wakes once per few frames, not once per frame); a live source's frames one per free slot."""
    counting = Counting(runner)
    src = Pulls(images, counting, 40, live=live)
    out = list(stream_detect(counting, src, batch=1, queue_size=8, workers=1))
    assert [f.index for f, _ in out] == list(range(40))
    steady = src.at[16:32]                      # after the first fill, before the source runs dry
    groups = len(set(steady))                   # frames taken between the same two inference calls: one burst
    if live:                                    # one per call (16), a few merged where a thread ran late
        assert groups >= 10, steady
    else:                                       # bursts of 4 (4 groups), a few split where a thread ran late
        assert groups <= 7, steady
    assert not stream_threads()


def test_wait_until_at_most_returns_on_drain_and_on_stop():
    import queue as queue_mod

    from darkconv.pipeline import _wait_until_at_most

    q = queue_mod.Queue(4)
    for i in range(4):
        q.put(i)
    stop = threading.Event()

    def drain():
        for _ in range(3):
            time.sleep(0.02)
            q.get()

    th = threading.Thread(target=drain)
    th.start()
    t0 = time.perf_counter()
    _wait_until_at_most(q, 1, stop)
    assert q.qsize() <= 1 and time.perf_counter() - t0 >= 0.05
    th.join()
    q.put(9)
    q.put(9)
    threading.Timer(0.05, stop.set).start()
    _wait_until_at_most(q, 0, stop)             # never drained: returns once stop is set
    assert stop.is_set() and q.qsize() == 3
