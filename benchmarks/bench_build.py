#!/usr/bin/env python
"""Graph construction time against the number of layers (issue #13: it was quadratic).

A synthetic cfg of N layers (1x1 convolutions with shortcuts every other layer, on a 32x32
input, one [yolo] head) is parsed, planned (builders + memory check) and built into a
DarknetModel, without and with parameter initialisation (``init=False`` is what
``darkconv.load(cfg, weights)`` uses). The old free schedule (``_free_after``: for each
layer, a scan over every layer's last use) is timed on the same inputs up to 20,000 layers,
next to the linear one, in the same run.

Usage: flock -x /tmp/darkconv-cpu.lock python benchmarks/bench_build.py [--layers 1000 10000 20000 100000]
Writes benchmarks/results/bench_build.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from darkconv.darknet.cfg import parse_cfg  # noqa: E402
from darkconv.graph import memory  # noqa: E402
from darkconv.graph.model import DarknetModel, free_schedule, plan_network  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OLD_SCHEDULE_MAX = 20_000  # the quadratic schedule alone takes minutes beyond this


def synthetic_cfg(n: int) -> str:
    """N layer sections: conv, (conv, shortcut)*, head conv, [yolo]."""
    parts = ["[net]\nwidth=32\nheight=32\nchannels=3\n\n[convolutional]\nfilters=8\nsize=1\nactivation=leaky\n"]
    k = 1
    while k < n - 2:
        parts.append("\n[convolutional]\nfilters=8\nsize=1\nactivation=leaky\n\n[shortcut]\nfrom=-2\n")
        k += 2
    parts.append("\n[convolutional]\nfilters=6\nsize=1\nactivation=linear\n"
                 "\n[yolo]\nmask=0\nanchors=10,14\nclasses=1\nnum=1\n")
    return "".join(parts)


def old_free_schedule(inputs, keep):
    """The schedule as it was before #13 (one scan of last_use per layer: O(layers^2))."""
    last_use = {}
    for i, ins in enumerate(inputs):
        for j in ins:
            last_use[j] = i
    for j in keep:
        last_use[j] = len(inputs)
    return [[j for j, u in last_use.items() if u == i and j >= 0] for i in range(len(inputs))]


def machine() -> dict:
    cpu, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
        have = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
        flags = sorted(f for f in have if f in ("avx2", "fma") or f.startswith(("avx512", "amx")) or "vnni" in f)
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "flags": flags, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average": list(os.getloadavg())}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measure(n: int) -> dict:
    text = synthetic_cfg(n)
    t_parse, cfg = timed(lambda: parse_cfg("synthetic.cfg", text))
    t_plan, (plan, heads) = timed(lambda: plan_network(cfg, (3, 32, 32)))
    t_mem, _ = timed(lambda: memory.check(cfg, plan, (3, 32, 32)))
    inputs = [b.inputs if b.inputs is not None else (s.index - 1,) for s, b in zip(cfg.layers, plan)]
    keep = [h.layer - 1 for h in heads]
    t_sched, new = timed(lambda: free_schedule(inputs, keep))
    row = {"layers": len(cfg.layers), "parse_s": t_parse, "plan_s": t_plan, "memory_check_s": t_mem,
           "free_schedule_s": t_sched}
    if n <= OLD_SCHEDULE_MAX:
        t_old, old = timed(lambda: old_free_schedule(inputs, keep))
        row["old_free_schedule_s"] = t_old
        # the same outputs are dropped (the new one also drops outputs nobody reads, at once)
        row["schedules_agree"] = all(set(o) <= set(nw) for o, nw in zip(old, new))
    row["build_noinit_s"], _ = timed(lambda: DarknetModel(cfg, init=False))
    row["build_s"], _ = timed(lambda: DarknetModel(cfg))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1000, 10000, 20000, 100000])
    args = ap.parse_args()
    rows = []
    for n in args.layers:
        row = measure(n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    env = machine()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_build.json"), "w") as fh:
        json.dump({"schema": "darkconv.bench_build/1", "machine": env, "rows": rows}, fh, indent=2)
    lines = ["# Graph construction vs number of layers (`benchmarks/bench_build.py`)", "",
             f"Machine: {env['cpu']} ({env['logical_cpus']} logical CPUs; flags: {', '.join(env['flags']) or 'none'}), "
             f"Python {env['python']}, torch {env['torch']}, load average {env['load_average'][0]:.2f}.", "",
             "| layers | parse | plan (builders) | memory check | free schedule | old free schedule (quadratic) "
             "| build, init=False | build (default init) | per layer (build) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        old = f"{r['old_free_schedule_s']:.3f} s" if "old_free_schedule_s" in r else "not run (minutes)"
        lines.append(f"| {r['layers']:,} | {r['parse_s']:.2f} s | {r['plan_s']:.2f} s | {r['memory_check_s']:.3f} s "
                     f"| {r['free_schedule_s']:.3f} s | {old} | {r['build_noinit_s']:.2f} s | {r['build_s']:.2f} s "
                     f"| {r['build_s'] / r['layers'] * 1e3:.2f} ms |")
    lines += ["", "Every step is linear in the number of layers; what remains per layer is torch's own "
              "`nn.Module` construction (about 0.3-0.6 ms per convolution on this machine)."]
    with open(os.path.join(RESULTS, "bench_build.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
