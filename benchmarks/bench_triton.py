#!/usr/bin/env python3
"""The real yolov3-tiny served by a real Triton Inference Server on this CPU, next to in-process ONNX Runtime.

* Model: the COCO yolov3-tiny (``darkconv.zoo.default_model``), FP32 ONNX, 416x416, exported with
  ``darkconv export triton --platform python`` (the bundled server has only the python backend: the
  network runs on ONNX Runtime inside a python-backend model, through darkconv's runner).
* Server: the ``tritonserver`` binary of nvidia-pytriton 0.7.0 (``darkconv.serve``), loopback only,
  dynamic batching (preferred 4, 8; queue delay 1 ms), ONNX Runtime spin-waiting off in the server
  (its threads share the cores with the server's). Two layouts: 1 instance x 2 ORT threads and
  2 instances x 1 ORT thread.
* Load: ``c`` client threads (c = 1, 2, 4, 8, 16), each a closed loop of single-image requests
  (``TritonRunner.infer``, raw heads over HTTP, binary tensors), a bounded number of requests per
  level. In-process: the same ``c`` threads calling one ONNX Runtime session (2 intra-op threads)
  with the same inputs. Each level runs 3 alternating rounds (in-process, served, in-process, ...) so
  both sides see the same machine load; throughput = requests / wall time (median of rounds), the
  ratio is the median of the per-round ratios; p50 / p99 over all requests of the level.
* Dynamic batching: Triton's own metrics (``nv_inference_count`` / ``nv_inference_exec_count`` of the
  network per level): inferences per execution = the mean batch the server formed.
* Faults (bounded): one server SIGKILLed a third of the way through a run -> every request is either
  answered with the exact heads or reported failed (InferenceError), none lost or duplicated; two
  servers with one SIGKILLed -> every request answered.

Writes ``benchmarks/results/bench_triton.{md,json}`` (or ``--out``).

    flock -x /tmp/darkconv-cpu.lock python3 benchmarks/bench_triton.py          # ~6 min on 2 cores
    python3 benchmarks/bench_triton.py --quick --out /tmp/x                     # a smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from darkconv import bench as bm  # noqa: E402
from darkconv import zoo  # noqa: E402
from darkconv.errors import InferenceError  # noqa: E402
from darkconv.export.onnx import export_onnx  # noqa: E402
from darkconv.export.triton import export_triton  # noqa: E402
from darkconv.pipeline import DATA, read_names  # noqa: E402
from darkconv.preprocess import load_images, preprocess_batch  # noqa: E402
from darkconv.runners.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from darkconv.runners.triton import TritonRunner  # noqa: E402
from darkconv.serve import TritonServer, free_ports  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NAME = "yolov3-tiny"
GOAL = 0.8  # served throughput >= 0.8x in-process at concurrency 8
ROUNDS = 3  # alternating served / in-process rounds per concurrency level


def metric(server: TritonServer, name: str, model: str = NAME) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    m = re.search(rf'^{name}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else float("nan")


def pooled(runs: list[dict]) -> dict:
    """Rounds of one side -> its throughput (median of rounds) and latency percentiles over all requests."""
    a = np.concatenate([r["latencies_ms"] for r in runs])
    return {"requests": int(a.size), "rounds": len(runs),
            "throughput_ips": float(np.median([r["throughput_ips"] for r in runs])),
            "round_throughput_ips": [r["throughput_ips"] for r in runs],
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def closed_loop(fn, inputs, concurrency: int, requests: int) -> dict:
    """``concurrency`` threads, each calling ``fn(x)`` in a loop, ``requests`` calls in all."""
    lat, lock, nxt = [], threading.Lock(), iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t = time.perf_counter()
            fn(inputs[i % len(inputs)])
            d = time.perf_counter() - t
            with lock:
                lat.append(d)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1e3
    return {"requests": len(lat), "wall_s": wall, "throughput_ips": len(lat) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "latencies_ms": a}


def measure_layout(onnx_path, inputs, instances: int, threads: int, levels, per_level, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="darkconv-bench-triton-") as tmp:
        export_triton(onnx_path, tmp, name=NAME, platform="python", image_input="uint8", max_batch=8,
                      instances=instances, threads=threads)
        h, g, m = free_ports(3)
        server = TritonServer(tmp, http_port=h, grpc_port=g, metrics_port=m)
        t0 = time.perf_counter()
        server.start(timeout=600)
        startup = time.perf_counter() - t0
        rows = []
        local = OnnxRuntimeRunner(onnx_path, threads=2)
        local.activate()
        try:
            with TritonRunner(NAME, server.url) as remote:
                closed_loop(remote.infer, inputs, 2, 8)  # warm both
                closed_loop(local.infer, inputs, 2, 8)
                for c in levels:
                    n = max(per_level, 2 * c)
                    rounds, c0, e0 = [], metric(server, "nv_inference_count"), metric(server, "nv_inference_exec_count")
                    for _ in range(ROUNDS):  # alternate, so both sides see the same machine load
                        inproc = closed_loop(local.infer, inputs, c, n)
                        served = closed_loop(remote.infer, inputs, c, n)
                        rounds.append((served, inproc))
                    c1, e1 = metric(server, "nv_inference_count"), metric(server, "nv_inference_exec_count")
                    served, inproc = pooled([a for a, _ in rounds]), pooled([b for _, b in rounds])
                    row = {"concurrency": c, "served": served, "in_process": inproc,
                           "inference_count": c1 - c0, "execution_count": e1 - e0,
                           "mean_server_batch": (c1 - c0) / (e1 - e0) if e1 > e0 else None,
                           "round_ratios": [a["throughput_ips"] / b["throughput_ips"] for a, b in rounds]}
                    row["served_over_in_process"] = float(np.median(row["round_ratios"]))
                    rows.append(row)
                    log(f"  {instances}x{threads}  c={c:2d}: served {served['throughput_ips']:6.1f} img/s "
                        f"(p50 {served['p50_ms']:6.1f}, p99 {served['p99_ms']:6.1f} ms), in-process "
                        f"{inproc['throughput_ips']:6.1f} img/s (p50 {inproc['p50_ms']:6.1f} ms), ratio "
                        f"{row['served_over_in_process']:.2f} (rounds "
                        f"{', '.join(f'{q:.2f}' for q in row['round_ratios'])}), server batch "
                        f"{row['mean_server_batch'] or 0:.2f}")
        finally:
            local.deactivate()
            server.close()
    return {"instances": instances, "ort_threads": threads, "startup_s": startup, "levels": rows}


def fault_runs(onnx_path, inputs, reference, requests: int, log) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="darkconv-bench-triton-") as tmp:
        export_triton(onnx_path, tmp, name=NAME, platform="python", image_input="uint8", max_batch=8, threads=1)
        for case, n_servers in (("one_server_killed", 1), ("two_servers_one_killed", 2)):
            servers = []
            for _ in range(n_servers):
                h, g, m = free_ports(3)
                servers.append(TritonServer(tmp, http_port=h, grpc_port=g, metrics_port=m).start(timeout=600))
            try:
                runner = TritonRunner(NAME, ",".join(s.url for s in servers), cooldown=60)
                runner.activate()
                lock, state = threading.Lock(), {"done": 0}
                killed = threading.Event()

                def job(i):
                    k = i % len(inputs)
                    try:
                        heads = runner.infer(inputs[k])
                        res = "correct" if all(np.array_equal(a, b) for a, b in zip(heads, reference[k])) \
                            else "wrong"
                    except InferenceError:
                        res = "failed"
                    with lock:
                        state["done"] += 1
                        if state["done"] == requests // 3:
                            killed.set()
                    return i, res

                t0 = time.perf_counter()
                with ThreadPoolExecutor(4) as pool:
                    futs = [pool.submit(job, i) for i in range(requests)]
                    killed.wait(600)
                    servers[0].kill()
                    results = [f.result() for f in futs]
                ids = [i for i, _ in results]
                tally = {k: sum(r == k for _, r in results) for k in ("correct", "wrong", "failed")}
                out[case] = {"servers": n_servers, "requests": requests, **tally,
                             "lost": len(set(range(requests)) - set(ids)), "duplicated": len(ids) - len(set(ids)),
                             "per_server": runner.stats(), "wall_s": time.perf_counter() - t0}
                log(f"  {case}: {tally}, lost {out[case]['lost']}, duplicated {out[case]['duplicated']}")
            finally:
                for s in servers:
                    s.close()
    return out


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_triton.json").write_text(json.dumps(result, indent=1, default=lambda o: None))
    env = result["environment"]
    lines = [f"# Triton serving vs in-process ONNX Runtime — {NAME} 416x416 FP32", "",
             f"{result['created']} · {env['cpu_model']} · {env['cpu_cores']} cores · flags {', '.join(env['cpu_features'])}"
             f" · no GPU · Triton (nvidia-pytriton 0.7.0 tritonserver, python backend) · loopback HTTP · "
             f"load avg {env['load_avg_1_5_15']}", "",
             "Client: c threads, closed loop of single-image requests (raw heads, binary HTTP). In-process: the same "
             "c threads on one ONNX Runtime session (2 threads). Each level: 3 alternating rounds (in-process, served); "
             "img/s = median of rounds, served / in-process = median of the per-round ratios. "
             "Server batch = nv_inference_count / nv_inference_exec_count over the level.", ""]
    for lay in result["layouts"]:
        lines += [f"## {lay['instances']} instance(s) x {lay['ort_threads']} ORT thread(s) "
                  f"(server ready in {lay['startup_s']:.1f} s)", "",
                  "| concurrency | served img/s | p50 ms | p99 ms | in-process img/s | p50 ms | p99 ms | served / in-process "
                  "| inferences / executions | server batch |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in lay["levels"]:
            s, i = r["served"], r["in_process"]
            lines.append(f"| {r['concurrency']} | {s['throughput_ips']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                         f"{i['throughput_ips']:.1f} | {i['p50_ms']:.1f} | {i['p99_ms']:.1f} | "
                         f"{r['served_over_in_process']:.2f} | {r['inference_count']:.0f} / {r['execution_count']:.0f}"
                         f" | {r['mean_server_batch'] or 0:.2f} |")
        lines.append("")
    g = result["goal"]
    lines += [f"**Goal** served >= {GOAL}x in-process at concurrency 8: best layout {g['layout']} gives "
              f"{g['ratio']:.2f}x — **{'met' if g['met'] else 'missed'}**.", "",
              "## Faults (SIGKILL of a server a third of the way through; 4 client threads)", "",
              "| case | requests | correct | wrong | failed (reported) | lost | duplicated |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k, f in result["faults"].items():
        lines.append(f"| {k} | {f['requests']} | {f['correct']} | {f['wrong']} | {f['failed']} | {f['lost']} | "
                     f"{f['duplicated']} |")
    lines.append("")
    (out / "bench_triton.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="few requests, one layout (a smoke run)")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least 2x c)")
    args = ap.parse_args(argv)
    log = print
    levels = [1, 2, 4, 8, 16] if not args.quick else [1, 8]
    per_level = args.requests if not args.quick else 16
    files = zoo.default_model(log=log)
    import darkconv

    with tempfile.TemporaryDirectory(prefix="darkconv-bench-triton-") as tmp:
        onnx_path = export_onnx(darkconv.load(files.cfg, files.weights), Path(tmp) / f"{NAME}.onnx",
                                names=read_names(files.names))
        images = [im for im in load_images(sorted(DATA.glob("*.jpg")))]
        x = preprocess_batch(images, (416, 416), False)
        inputs = [x[i:i + 1] for i in range(len(x))]
        with OnnxRuntimeRunner(onnx_path, threads=2) as r:
            reference = [r.infer(a) for a in inputs]
        layouts = []
        for inst, thr in ([(1, 2), (2, 1)] if not args.quick else [(1, 2)]):
            log(f"layout: {inst} instance(s) x {thr} ORT thread(s)")
            layouts.append(measure_layout(onnx_path, inputs, inst, thr, levels, per_level, log))
        log("faults")
        faults = fault_runs(onnx_path, inputs, reference, 30 if args.quick else 60, log)
    best = max(layouts, key=lambda lay: next((r["served_over_in_process"] for r in lay["levels"]
                                              if r["concurrency"] == 8), 0))
    ratio = next((r["served_over_in_process"] for r in best["levels"] if r["concurrency"] == 8), None)
    env = bm.environment(2)
    result = {"schema": "darkconv.bench_triton/1", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "model": NAME, "environment": env, "levels": levels, "requests_per_level": per_level,
              "layouts": layouts, "faults": faults,
              "goal": {"target": GOAL, "layout": f"{best['instances']}x{best['ort_threads']}", "ratio": ratio,
                       "met": ratio is not None and ratio >= GOAL}}
    write(result, args.out)
    log(f"wrote {args.out / 'bench_triton.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
