"""Statistics of a benchmark run: per-call latencies -> ms figures, end-to-end stage splits, batch lists."""
from __future__ import annotations

import numpy as np

STAGES = ("decode", "preprocess", "inference", "postprocess")
STAT_KEYS = ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "std_ms", "per_image_ms",
             "throughput_ips")
MIN_ITERS = 3


def latency_stats(samples, batch: int = 1) -> dict:
    """Per-call latencies (seconds) -> ms statistics, per-image latency and images/s.

    Percentiles are numpy's (linear interpolation). An empty list gives ``iters`` 0 and
    None for every figure.
    """
    a = np.asarray(list(samples), np.float64) * 1e3
    out: dict = {"iters": int(a.size), "batch": int(batch)}
    if a.size == 0:
        return {**out, **{k: None for k in STAT_KEYS}}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    mean = float(a.mean())
    out.update(mean_ms=mean, p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), min_ms=float(a.min()),
               max_ms=float(a.max()), std_ms=float(a.std()), per_image_ms=mean / batch,
               throughput_ips=batch * 1e3 / mean if mean > 0 else None)
    return out


def parse_batches(text) -> list[int]:
    """'1,4,8' -> [1, 4, 8] (positive, duplicates dropped, order kept)."""
    items = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    out: list[int] = []
    for it in items:
        if it in ("", None):
            continue
        try:
            n = int(it)
        except (TypeError, ValueError):
            raise ValueError(f"{text!r}: expected batch sizes like 1,4,8") from None
        if n <= 0:
            raise ValueError(f"{text!r}: batch sizes must be positive")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError(f"{text!r}: no batch size given")
    return out


def split_stats(splits: list[dict], batch: int, raw_per_image_ms: float | None = None) -> dict:
    """Stage splits of the end-to-end loop -> mean ms per image per stage, total, ratio to raw inference.

    When the splits carry ``raw`` (seconds of a bare ``infer`` call made in the same iteration),
    the ratio uses those, so that a change in the machine's load between two loops cannot skew
    it; otherwise ``raw_per_image_ms``.
    """
    n = len(splits)
    out: dict = {"iters": n, "batch": int(batch), "images": n * int(batch)}
    if n == 0:
        return {**out, **{f"{s}_ms": None for s in STAGES}, "total_ms": None, "throughput_ips": None,
                "raw_inference_ms": raw_per_image_ms, "e2e_over_inference": None}
    if all("raw" in d for d in splits):
        raw_per_image_ms = float(np.mean([d["raw"] for d in splits])) * 1e3 / batch
    out["raw_inference_ms"] = raw_per_image_ms
    for s in STAGES:
        out[f"{s}_ms"] = float(np.mean([d.get(s, 0.0) for d in splits])) * 1e3 / batch
    total = sum(out[f"{s}_ms"] for s in STAGES)
    out["total_ms"] = total
    out["throughput_ips"] = 1e3 / total if total > 0 else None
    out["e2e_over_inference"] = total / raw_per_image_ms if raw_per_image_ms else None
    return out
