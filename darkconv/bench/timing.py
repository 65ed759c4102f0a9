"""The timing loops: one caller (``time_loop``) or many threads in closed loops (``concurrent_loop``)."""
from __future__ import annotations

import time

from .stats import MIN_ITERS


def time_loop(step, *, warmup: int = 1, iters: int | None = None, seconds: float | None = None,
              min_iters: int = MIN_ITERS, progress=None, desc: str = ""):
    """Call ``step()`` ``warmup`` times untimed, then time it ``iters`` times, or until
    ``seconds`` have been spent (at least ``min_iters`` calls).

    Returns ``(samples, splits, interrupted)``: per-call seconds, the dicts ``step``
    returned (stage splits, when it returns any) and whether a KeyboardInterrupt cut
    the loop short (what was measured until then is kept).
    """
    if iters is None and seconds is None:
        iters = 10
    samples: list[float] = []
    splits: list[dict] = []
    interrupted = False
    bar = progress(total=(warmup + iters) if iters is not None else None, desc=f"{desc} warmup") \
        if progress else None
    try:
        for _ in range(warmup):
            step()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.set_description(desc)
        start = time.perf_counter()
        while True:
            n = len(samples)
            if iters is not None and n >= iters:
                break
            if iters is None and n >= min_iters and time.perf_counter() - start >= seconds:
                break
            t0 = time.perf_counter()
            split = step()
            samples.append(time.perf_counter() - t0)
            if isinstance(split, dict):
                splits.append(split)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    return samples, splits, interrupted


def concurrent_loop(step, concurrency: int, *, iters: int | None = None, seconds: float | None = None,
                    min_iters: int = MIN_ITERS) -> tuple[list[float], float]:
    """``concurrency`` threads calling ``step()`` in closed loops (a request in flight per thread), ``iters``
    calls in all, or until ``seconds`` have passed (at least ``min_iters`` per thread). Returns the per-call
    seconds and the wall time, for throughput = calls / wall."""
    import threading

    samples: list[float] = []
    lock = threading.Lock()
    state = {"left": iters if iters is not None else None, "error": None}
    start = time.perf_counter()

    def worker():
        n = 0
        while state["error"] is None:
            with lock:
                if state["left"] is not None:
                    if state["left"] <= 0:
                        return
                    state["left"] -= 1
            if state["left"] is None and n >= min_iters and time.perf_counter() - start >= seconds:
                return
            t0 = time.perf_counter()
            try:
                step()
            except Exception as e:  # noqa: BLE001 - stop every thread, report in the row
                state["error"] = e
                return
            with lock:
                samples.append(time.perf_counter() - t0)
            n += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["error"] is not None:
        raise state["error"]
    return samples, time.perf_counter() - start
