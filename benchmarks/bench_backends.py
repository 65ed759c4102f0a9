#!/usr/bin/env python3
"""darkconv's backends against OpenCV DNN, same model, same input, one process, one machine.

Models (416x416): yolov3-tiny with the real COCO weights (``darkconv.zoo.default_model``) and
yolov3 with random weights written to a temporary ``.weights`` file (so every loader reads a
real file; speed does not depend on the weight values). Backends:

* OpenCV DNN as its users run it: ``cv2.dnn.readNetFromDarknet``, ``cv2.setNumThreads(T)``,
  ``DNN_BACKEND_OPENCV`` / ``DNN_TARGET_CPU``, ``forward`` to the unconnected out layers;
* darkconv torch FP32 (``torch.set_num_threads(T)``);
* darkconv ONNX Runtime FP32 and INT8 (the Q/DQ recipe chosen for this CPU, ``int8_target="onnxruntime"``, calibrated on
  darkconv's bundled sample images), ``intra_op_num_threads=T``;
* TensorRT, when it and a GPU are present (otherwise listed as not measured, with the reason).

Every backend gets the same fixed input (the bundled sample images, Darknet-preprocessed,
cycled to the batch size). The backends are timed in interleaved rounds (a few calls of each in
turn, repeated), so that a change in the machine's load hits all of them alike; the ratios are
ratios of medians. Also measured: cfg/weights load, FP32 ONNX conversion and session creation,
and, for yolov3-tiny on ONNX Runtime FP32, the end-to-end split (decode, preprocess,
inference, postprocess) through ``darkconv.bench.run_bench`` (what ``darkconv bench --e2e`` runs).

Writes ``bench_backends.md``, ``bench_backends.json`` and ``bench_backends.png`` under
``benchmarks/results/`` (or ``--out``). Ctrl-C writes what was measured so far.

    python benchmarks/bench_backends.py            # ~3 min on 2 quiet cores, ~9 min on 2 busy ones
    python benchmarks/bench_backends.py --quick    # a smoke run, written to a temporary directory
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import darkconv
from darkconv import bench as bm
from darkconv import zoo
from darkconv.preprocess import load_image
from darkconv.errors import DarkconvError
from darkconv.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "darkconv" / "data"

TARGETS = {  # name -> (limit, description)
    "ort_vs_opencv": (0.55, "ONNX Runtime FP32 latency <= 0.55x OpenCV DNN"),
    "int8_vs_fp32": (0.60, "ONNX Runtime INT8 latency <= 0.6x FP32"),
    "e2e_vs_raw": (1.30, "end-to-end detect <= 1.3x raw inference (yolov3-tiny, ORT FP32)"),
    "yolov3_export_s": (5.0, "yolov3 -> FP32 ONNX conversion <= 5 s"),
    "yolov3_load_beyond_read_s": (1.0, "yolov3 load (248 MB weights) < 1 s beyond the file read"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- OpenCV DNN as its users run it -------------------------------------------------------------
class OpenCVDNN:
    name = "opencv"

    def __init__(self, cfg, weights, threads, winograd=True):
        self.cfg, self.weights, self.threads, self.winograd = str(cfg), str(weights), threads, winograd

    def activate(self):
        import cv2

        cv2.setNumThreads(self.threads)
        self.net = cv2.dnn.readNetFromDarknet(self.cfg, self.weights)
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        if not self.winograd:
            self.net.enableWinograd(False)  # OpenCV >= 4.7 runs 3x3 convs with Winograd by default
        self.outs = self.net.getUnconnectedOutLayersNames()

    def infer(self, x):
        self.net.setInput(x)
        return self.net.forward(self.outs)

    def deactivate(self):
        self.net = None

    def describe(self):
        import cv2
        return (f"OpenCV {cv2.__version__} DNN (readNetFromDarknet, DNN_BACKEND_OPENCV"
                f"{', Winograd off' if not self.winograd else ''})")


# -- load / conversion ----------------------------------------------------------------------------
def median_time(fn, n):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def measure_load(name, cfg, weights, onnx_path, reps):
    """Weights file read, cfg -> graph, cfg + weights load, FP32 ONNX export (writes onnx_path)."""
    from darkconv.export.onnx import export_onnx

    out = {"weights_mb": os.path.getsize(weights) / 1e6}
    out["file_read_s"], _ = median_time(lambda: Path(weights).read_bytes(), reps)
    darkconv.load(cfg)  # once untimed: first-call costs (lazy imports) are not the model's
    out["cfg_to_graph_s"], _ = median_time(lambda: darkconv.load(cfg), reps)
    out["load_s"], out["load_runs_s"] = median_time(lambda: darkconv.load(cfg, weights), reps)
    out["load_beyond_read_s"] = out["load_s"] - out["file_read_s"]
    model = darkconv.load(cfg, weights)
    out["export_fp32_s"], out["export_runs_s"] = median_time(lambda: export_onnx(model, onnx_path), max(1, reps - 1))
    out["onnx_mb"] = os.path.getsize(onnx_path) / 1e6
    log(f"{name}: load {out['load_s']:.2f} s (read {out['file_read_s']:.2f} s), "
        f"FP32 ONNX export {out['export_fp32_s']:.2f} s")
    return out


def args_threads(runner, threads):
    return threads if isinstance(runner, OpenCVDNN) else bm.threads_used(runner)


# -- one model through every backend ----------------------------------------------------------------
def bench_model(name, cfg, weights, *, random_weights, threads, batches, rounds, iters, warmup, workdir, reps,
                quick):
    res = {"model": name, "cfg": str(cfg), "weights_sha256": sha256_file(weights),
           "random_weights": random_weights, "backends": {}, "latency": {}, "errors": {}, "load": None,
           "interrupted": False}
    onnx_fp32 = Path(workdir) / f"{name}-fp32.onnx"
    res["load"] = measure_load(name, cfg, weights, onnx_fp32, reps)

    backends = {}  # key -> (runner, label)
    backends["opencv"] = (OpenCVDNN(cfg, weights, threads), "OpenCV DNN FP32")
    if not quick and name == "yolov3-tiny":  # reference: what Winograd gives OpenCV (not a target)
        backends["opencv_nowino"] = (OpenCVDNN(cfg, weights, threads, winograd=False),
                                     "OpenCV DNN FP32, Winograd off (reference)")
    preps = {}
    plans = [("torch_fp32", dict(model=cfg, weights=weights, backend="torch"), "darkconv torch FP32"),
             ("ort_fp32", dict(model=onnx_fp32, backend="onnxruntime"), "darkconv ORT FP32"),
             ("ort_int8", dict(model=cfg, weights=weights, backend="onnxruntime", precision="int8"),
              "darkconv ORT INT8 (recipe for this CPU)"),
             ("tensorrt", dict(model=cfg, weights=weights, backend="tensorrt", precision="fp16"),
              "darkconv TensorRT FP16")]
    for key, kw, label in plans:
        try:
            log(f"{name}: preparing {label}")
            p = bm.prepare(kw.pop("model"), kw.pop("weights", None), threads=threads, max_batch=max(batches),
                           log=log, **kw)
        except DarkconvError as e:
            res["errors"][key] = str(e)
            log(f"{name}: {label} not measured: {e}")
            continue
        preps[key] = p
        backends[key] = (p.runner, label)
    for key, (runner, label) in backends.items():
        t0 = time.perf_counter()
        runner.activate()
        session_s = time.perf_counter() - t0
        info = {"label": label, "describe": runner.describe(), "threads": args_threads(runner, threads)}
        if key in preps:
            info.update(preps[key].load)
            info["notes"] = preps[key].notes
        info["session_create_s"] = session_s
        res["backends"][key] = info

    spec = preps["ort_fp32"].runner.spec if "ort_fp32" in preps else darkconv.load(cfg).spec
    images = [load_image(p) for p in bm.sample_images()[:max(batches)]]
    res["load_avg_before"] = [round(v, 2) for v in os.getloadavg()]
    try:
        for b in batches:
            x = bm.fixed_input(spec, b, images)
            samples = {k: [] for k in backends}
            res["latency"][str(b)] = {}
            for rnd in range(rounds):
                for key, (runner, label) in backends.items():
                    time.sleep(0.2)  # let the previous backend's spinning threads go idle
                    s, _, stop = bm.time_loop(lambda: runner.infer(x), warmup=warmup if rnd == 0 else min(warmup, 1),
                                              iters=iters(b))
                    samples[key] += s
                    res["latency"][str(b)][key] = bm.latency_stats(samples[key], b)
                    if stop:
                        raise KeyboardInterrupt
                log(f"{name} batch {b} round {rnd + 1}/{rounds}: " + ", ".join(
                    f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in samples.items() if v))
    except KeyboardInterrupt:
        res["interrupted"] = True
    finally:
        res["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
        for key, (runner, _) in backends.items():
            runner.deactivate()
    if res["interrupted"]:
        for p in preps.values():
            p.cleanup()
        return res, None

    e2e = None
    if not random_weights and "ort_fp32" in preps:
        log(f"{name}: end to end on ORT FP32 (darkconv.bench.run_bench, --e2e {DATA})")
        p = bm.prepare(onnx_fp32, None, "onnxruntime", threads=threads)
        e2e = bm.run_bench(p, batches, warmup=warmup, iters=8 if quick else 25, e2e=[DATA])
        p.cleanup()
    for p in preps.values():
        p.cleanup()
    return res, e2e


# -- report ------------------------------------------------------------------------------------------
def ratio(a, b):
    return a / b if a and b else None


def fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)


def verdict(value, limit):
    if value is None:
        return "not measured"
    return "met" if value <= limit else "**MISSED**"


def compute_targets(models, e2e):
    rows = []
    for m in models:
        for b, lat in m["latency"].items():
            cv, o32, o8 = (lat.get(k, {}) for k in ("opencv", "ort_fp32", "ort_int8"))
            for key, a, b_ in (("ort_vs_opencv", o32, cv), ("int8_vs_fp32", o8, o32)):
                rows.append((key, f"{m['model']}, batch {b}", ratio(a.get("p50_ms"), b_.get("p50_ms")),
                             ratio(a.get("min_ms"), b_.get("min_ms"))))
        if m["model"] == "yolov3":
            rows.append(("yolov3_export_s", "yolov3", m["load"]["export_fp32_s"], min(m["load"]["export_runs_s"])))
            rows.append(("yolov3_load_beyond_read_s", "yolov3", m["load"]["load_beyond_read_s"],
                         min(m["load"]["load_runs_s"]) - m["load"]["file_read_s"]))
    if e2e:
        for r in e2e["results"]:
            if r.get("e2e"):
                rows.append(("e2e_vs_raw", f"yolov3-tiny, batch {r['batch']}", r["e2e"]["e2e_over_inference"], None))
    return [{"target": TARGETS[k][1], "key": k, "case": case, "limit": TARGETS[k][0], "value": v, "best": best,
             "met": None if v is None else v <= TARGETS[k][0]} for k, case, v, best in rows]


def markdown(doc) -> str:
    env, models, e2e = doc["environment"], doc["models"], doc["e2e"]
    v = env["versions"]
    L = ["# darkconv backends vs OpenCV DNN", "",
         f"- **Machine**: {env['cpu_model']} (`lscpu` model name), {env['cpu_cores']} cores "
         f"({env.get('cpu_cores_usable')} usable), SIMD: {', '.join(env.get('cpu_features') or []) or '?'}; "
         f"GPU: {env['gpu'] or 'none'}",
         f"- **Threads**: {doc['threads']} per backend; input 416x416; batches {', '.join(map(str, doc['batches']))}",
         f"- **Load average** (1 min) before / after: {doc['load_before'][0]} / {doc['load_after'][0]} "
         f"(other processes share this machine: absolute times are indicative, ratios are what to quote)",
         f"- **Software**: darkconv {v['darkconv']}, torch {v['torch']}, onnxruntime {v['onnxruntime']}, "
         f"OpenCV {v['opencv']}, numpy {v['numpy']}, TensorRT {v['tensorrt'] or 'not installed'}; "
         f"Python {env['python']}, {env['platform']}",
         f"- **Run**: {doc['created']}, `{doc['command']}`, {doc['wall_s']:.0f} s; backends timed in "
         f"interleaved rounds ({', '.join(f'{k}: {v}' for k, v in doc['rounds'].items())}); figures are medians (p50) unless marked",
         ""]
    if doc.get("interrupted"):
        L += ["**Interrupted (Ctrl-C): partial results.**", ""]
    L += ["## Targets", "",
          "`measured`: ratio of medians (p50), or the median time; `best case`: ratio of the minimum latencies, "
          "or the fastest run (the least disturbed by other processes). The verdict uses `measured`.", "",
          "| target | case | measured | best case | limit | result |", "|---|---|---:|---:|---:|---|"]
    for t in doc["targets"]:
        unit = " s" if t["key"].endswith("_s") else "x"
        L.append(f"| {t['target']} | {t['case']} | {fmt(t['value'])}{unit if t['value'] is not None else ''} | "
                 f"{fmt(t['best'])}{unit if t['best'] is not None else ''} | "
                 f"{t['limit']}{unit} | {verdict(t['value'], t['limit'])} |")
    L += ["", "## Inference latency", "",
          "Per call on a fixed batch, warmup excluded. `vs OpenCV` = p50 / OpenCV DNN's p50 at the same batch. "
          "Load average (1 min) while timing: " + "; ".join(
              f"{m['model']} {m.get('load_avg_before', ['?'])[0]} -> {m.get('load_avg_after', ['?'])[0]}"
              for m in models) + ".", "",
          "| model | backend | batch | calls | p50 ms | mean ms | p90 ms | p99 ms | min ms | ms/image | images/s "
          "| vs OpenCV |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        tag = m["model"] + (" (random weights)" if m["random_weights"] else "")
        for b, lat in m["latency"].items():
            cv = lat.get("opencv", {}).get("p50_ms")
            for key, st in lat.items():
                label = m["backends"].get(key, {}).get("label", key)
                L.append(f"| {tag} | {label} | {b} | {st['iters']} | {fmt(st['p50_ms'], '{:.1f}')} | "
                         f"{fmt(st['mean_ms'], '{:.1f}')} | {fmt(st['p90_ms'], '{:.1f}')} | "
                         f"{fmt(st['p99_ms'], '{:.1f}')} | {fmt(st['min_ms'], '{:.1f}')} | "
                         f"{fmt(st['per_image_ms'], '{:.1f}')} | {fmt(st['throughput_ips'], '{:.1f}')} | "
                         f"{fmt(ratio(st['p50_ms'], cv), '{:.2f}x')} |")
        for key, err in m["errors"].items():
            L.append(f"| {tag} | {key} | - | - | not measured: {err} |||||||")
    if e2e:
        L += ["", "## End to end: yolov3-tiny, ONNX Runtime FP32 (`darkconv bench --e2e darkconv/data`)", "",
              "ms per image (means); decode = file read + JPEG decode; `e2e/raw` = total / a raw inference "
              "call on the fixed input timed in the same iteration (same machine load).", "",
              "| batch | decode | preprocess | inference | postprocess | total | raw inference | e2e/raw |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in e2e["results"]:
            e = r.get("e2e")
            if e:
                L.append(f"| {r['batch']} | " + " | ".join(fmt(e[f'{s}_ms']) for s in bm.STAGES) +
                         f" | {fmt(e['total_ms'])} | {fmt(e['raw_inference_ms'])} | "
                         f"{fmt(e['e2e_over_inference'], '{:.2f}x')} |")
    L += ["", "## Load and conversion (seconds; medians)", "",
          "| model | weights MB | file read | cfg -> graph | cfg + weights load | load beyond read | "
          "FP32 ONNX export | ONNX MB | INT8 export + calibration | ORT FP32 session | OpenCV readNet | "
          "torch activate |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        ld, be = m["load"], m["backends"]
        L.append(f"| {m['model']} | {ld['weights_mb']:.1f} | {ld['file_read_s']:.3f} | {ld['cfg_to_graph_s']:.3f} | "
                 f"{ld['load_s']:.3f} | {ld['load_beyond_read_s']:.3f} | {ld['export_fp32_s']:.2f} | "
                 f"{ld['onnx_mb']:.1f} | {fmt(be.get('ort_int8', {}).get('export_s'))} | "
                 f"{fmt(be.get('ort_fp32', {}).get('session_create_s'), '{:.3f}')} | "
                 f"{fmt(be.get('opencv', {}).get('session_create_s'), '{:.3f}')} | "
                 f"{fmt(be.get('torch_fp32', {}).get('session_create_s'), '{:.3f}')} |")
    L += ["", "The weights file was just written or read, so \"file read\" is a page-cache read: "
          "\"load beyond read\" is what darkconv adds (cfg parsing, graph, copying into tensors).", ""]
    notes = sorted({n for m in models for b in m["backends"].values() for n in b.get("notes", [])})
    notes += ["yolov3 runs on random weights: its speed does not depend on the values; its end to end is not "
              "measured (random heads make postprocessing unrepresentative).",
              "With few calls (yolov3: one per round) p90/p99 are interpolated between a handful of samples.",
              "Why targets are missed, and what would meet them: benchmarks/README.md."]
    L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L) + "\n"


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in doc["models"] if m["latency"]]
    ncols = len(models) + (1 if doc["e2e"] else 0)
    fig, axes = plt.subplots(1, max(ncols, 1), figsize=(5.2 * max(ncols, 1), 4.4), squeeze=False)
    colors = {"opencv": "tab:blue", "opencv_nowino": "tab:cyan", "torch_fp32": "tab:orange",
              "ort_fp32": "tab:green", "ort_int8": "tab:red", "tensorrt": "tab:purple"}
    for ax, m in zip(axes[0], models):
        batches = list(m["latency"])
        keys = [k for k in m["backends"] if any(k in m["latency"][b] for b in batches)]
        w = 0.8 / max(len(keys), 1)
        top = 0.0
        for i, k in enumerate(keys):
            vals = [m["latency"][b].get(k, {}).get("p50_ms") or 0 for b in batches]
            vals = [v / int(b) for v, b in zip(vals, batches)]
            top = max(top, *vals)
            bars = ax.bar(np.arange(len(batches)) + i * w, vals, w, label=m["backends"][k]["label"],
                          color=colors.get(k))
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_ylim(0, top * 1.45)
        ax.set_xticks(np.arange(len(batches)) + w * (len(keys) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set_ylabel("p50 latency per image (ms)")
        ax.set_title(m["model"] + (" (random weights)" if m["random_weights"] else ""))
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    if doc["e2e"]:
        ax = axes[0][-1]
        rows = [r for r in doc["e2e"]["results"] if r.get("e2e")]
        labels = [f"batch {r['batch']}" for r in rows]
        bottom = np.zeros(len(rows))
        for s in bm.STAGES:
            v = np.array([r["e2e"][f"{s}_ms"] for r in rows])
            ax.bar(labels, v, bottom=bottom, label=s)
            bottom += v
        ax.plot(labels, [r["e2e"]["raw_inference_ms"] for r in rows], "k_", markersize=40, mew=2,
                label="raw inference")
        for x_, r in enumerate(rows):
            ax.annotate(f"{r['e2e']['e2e_over_inference']:.2f}x raw", (x_, bottom[x_]), ha="center", va="bottom",
                        fontsize=8)
        ax.set_ylim(0, bottom.max() * 1.35)
        ax.set_ylabel("ms per image (mean)")
        ax.set_title("yolov3-tiny end to end, ORT FP32")
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    env = doc["environment"]
    fig.suptitle(f"darkconv vs OpenCV DNN - {env['cpu_model']}, {doc['threads']} threads, 416x416", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="4", help="the larger batch size (batch 1 is always run)")
    ap.add_argument("--models", default="yolov3-tiny,yolov3")
    ap.add_argument("--out", type=Path, default=None, help=f"[default: {RESULTS.relative_to(ROOT)}; "
                                                           "--quick: a temporary directory]")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (fewer rounds and calls)")
    ap.add_argument("--replot", type=Path, metavar="JSON", help="only rewrite the .md and .png of a saved run")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="darkconv-bb-quick-")) if args.quick else RESULTS
    if args.replot:
        doc = json.loads(args.replot.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_backends.md").write_text(markdown(doc))
        plot(doc, args.out / "bench_backends.png")
        return 0
    batches = bm.parse_batches(f"1,{args.batch}")
    t_start = time.perf_counter()
    env = bm.environment(args.threads)
    doc = {"schema": "darkconv.bench_backends/1", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", "benchmarks/bench_backends.py", *(argv if argv is not None else sys.argv[1:])]),
           "threads": args.threads, "batches": batches, "rounds": {}, "load_before": [round(v, 2) for v in os.getloadavg()],
           "models": [], "e2e": None, "interrupted": False, "environment": env}
    try:
        with tempfile.TemporaryDirectory(prefix="darkconv-bb-") as tmp:
            for name in [s.strip() for s in args.models.split(",") if s.strip()]:
                big = name != "yolov3-tiny"
                if name == "yolov3-tiny":
                    files = zoo.default_model(log=log)
                    cfg, weights, random_weights = files.cfg, files.weights, False
                else:
                    cfg = ROOT / "cfg" / f"{name}.cfg"
                    weights = Path(tmp) / f"{name}-random.weights"
                    log(f"{name}: writing random weights to {weights}")
                    darkconv.load(cfg).randomize(0).save_weights(weights)
                    random_weights = True
                rounds = (2 if args.quick else 3) if big else (2 if args.quick else 6)
                doc["rounds"][name] = rounds
                per_round = (lambda b: 1) if big else (lambda b: max(2, (3 if args.quick else 8) // b))
                res, e2e = bench_model(name, cfg, weights, random_weights=random_weights, threads=args.threads,
                                       batches=batches, rounds=rounds, iters=per_round, warmup=1 if big else 3,
                                       workdir=tmp, reps=2 if (big or args.quick) else 3, quick=args.quick)
                doc["models"].append(res)
                if e2e:
                    doc["e2e"] = e2e
                if res["interrupted"]:
                    doc["interrupted"] = True
                    break
    except KeyboardInterrupt:
        doc["interrupted"] = True
    doc["load_after"] = [round(v, 2) for v in os.getloadavg()]
    doc["wall_s"] = time.perf_counter() - t_start
    doc["targets"] = compute_targets(doc["models"], doc["e2e"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_backends.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "bench_backends.md").write_text(markdown(doc))
    if any(m["latency"] for m in doc["models"]):
        plot(doc, args.out / "bench_backends.png")
    print(markdown(doc))
    log(f"wrote {args.out}/bench_backends.{{md,json,png}} in {doc['wall_s']:.0f} s")
    return 130 if doc["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
