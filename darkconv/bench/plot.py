"""A result as a PNG: latency vs batch size, and the end-to-end split per image (matplotlib, Agg)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..io import atomic_write
from .stats import STAGES


def plot(result: dict, path) -> Path:
    """Latency vs batch size, and the end-to-end split per image (when measured), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if r.get("latency") and r["latency"]["iters"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if rows:
        bs = [r["batch"] for r in rows]
        lat = [r["latency"] for r in rows]
        ax1.plot(bs, [x["mean_ms"] for x in lat], "o-", label="mean")
        ax1.plot(bs, [x["p50_ms"] for x in lat], "s--", label="p50")
        ax1.plot(bs, [x["p99_ms"] for x in lat], "^:", label="p99")
        ax1.plot(bs, [x["min_ms"] for x in lat], "v:", label="min")
        ax1.set_xticks(bs)
        ax1b = ax1.twinx()
        ax1b.plot(bs, [x["per_image_ms"] for x in lat], "o-", color="grey", alpha=0.6, label="ms / image")
        ax1b.set_ylabel("ms per image (grey)", color="grey")
        ax1b.set_ylim(bottom=0)
        ax1.set_ylim(bottom=0)
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("latency per batch (ms)")
    ax1.set_title("inference latency vs batch")
    e2e = [r for r in result["results"] if r.get("e2e") and r["e2e"]["iters"]]
    if e2e:
        labels = [str(r["batch"]) for r in e2e]
        bottom = np.zeros(len(e2e))
        for s in STAGES:
            v = np.array([r["e2e"][f"{s}_ms"] for r in e2e])
            ax2.bar(labels, v, bottom=bottom, label=s)
            bottom += v
        ax2.set_xlabel("batch size")
        ax2.set_ylabel("ms per image")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no end-to-end run\n(darkconv bench --e2e IMAGES)", ha="center", va="center",
                 transform=ax2.transAxes)
        ax2.set_xticks([])
        ax2.set_yticks([])
    ax2.set_title("end-to-end split per image")
    m, b, env = result["model"], result["backend"], result.get("environment") or {}
    title = (f"{Path(m['path']).name}{' (random weights)' if m.get('random_weights') else ''} on "
             f"{b['name']} {b['precision']}, {b.get('threads') or '?'} threads, {env.get('cpu_model', '')}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, [buf.getvalue()])
    return path
