#!/usr/bin/env python3
"""INT8 recipes x models x calibration methods: held-out agreement with FP32, latency vs FP32 and OpenCV DNN.

Models (416x416, real weights): the COCO yolov3-tiny and the 10-class yolov4-tiny-10 (darkconv.zoo).
Images: A = the 5 bundled sample images, B = the 8 zoo photos (scikit-image + matplotlib sample photographs).
Held out, two folds: calibrate on A and judge on B, calibrate on B and judge on A; ``pooled`` is the
agreement over all 13 images, each judged by a model that was not calibrated on it.

* agreement: Darknet ``detector map`` AP@0.5 of the INT8 detections (thresh 0.005) against the FP32
  detections > 0.25, mean over classes with truths (``darkconv.int8.agreement``, darkconv.metrics);
  also matched / lost / new detections at 0.25 and max |Δscore| of the matched ones;
* head error: mean over heads of ||INT8 - FP32|| / ||FP32||;
* latency: ONNX Runtime CPU, batch 1, ``--threads`` threads, all models of one network timed in
  interleaved rounds in one process (ratios of medians), next to OpenCV DNN FP32 as its users run it
  (``readNetFromDarknet``, default backend, Winograd on), under the exclusive CPU lock;
* mixed precision (``darkconv.int8.convert_int8`` with a budget) for the recipes that miss it;
* sensitivity cost: the per-conv probe of a random-weight yolov4 (110 convs) at 416 on 2 images.

Writes ``benchmarks/results/bench_int8.md`` and ``.json`` (or ``--out DIR``).

    python benchmarks/bench_int8.py                 # ~25 min on 2 busy cores (entropy calibration is most of it)
    python benchmarks/bench_int8.py --quick         # percentile only, 2 recipes, no yolov4: a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's darkconv, not an installed one

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import darkconv  # noqa: E402
from darkconv import int8 as I  # noqa: E402
from darkconv import zoo  # noqa: E402
from darkconv.compare import DetectionDiff, compare_detections  # noqa: E402
from darkconv.cpu import cpu_info  # noqa: E402
from darkconv.io import sha256_file  # noqa: E402
from darkconv.export import quantize as qz  # noqa: E402
from darkconv.export.onnx import to_onnx_model  # noqa: E402
from darkconv.pipeline import DATA  # noqa: E402
from darkconv.postprocess import postprocess  # noqa: E402
from darkconv.preprocess import load_image  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LOCK = "/tmp/darkconv-cpu.lock"
RECIPES = ["u8s8", "u8s8-rr", "s8s8", "u8u8", "u8s8-rr-pt", "tensorrt-conv", "tensorrt"]
METHODS = ["minmax", "percentile", "entropy"]
BUDGET = 0.98


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


LOCK_WAIT_S = 600
LOCK_STATE: dict = {}


@contextlib.contextmanager
def cpu_lock(exclusive: bool, what: str = ""):
    """TEAM.md's CPU lock: shared while computing accuracy, exclusive while timing. A lock that cannot be had
    within LOCK_WAIT_S (another process holding it for good) is recorded, with the load average, not waited on."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    t0, got = time.monotonic(), False
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                got = True
                break
            except BlockingIOError:
                if time.monotonic() - t0 > LOCK_WAIT_S:
                    break
                time.sleep(2)
        if what:
            LOCK_STATE[what] = ("exclusive" if exclusive else "shared") if got else \
                f"not acquired after {LOCK_WAIT_S} s (held by another process); load {os.getloadavg()[0]:.2f}"
            if not got:
                log(f"{what}: CPU lock not acquired after {LOCK_WAIT_S} s, going on (recorded)")
        yield got
    finally:
        if got:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def environment():
    import cv2
    import onnxruntime
    import torch

    c = cpu_info()
    return {"cpu_model": c.model, "arch": c.arch, "cpu_class": c.cpu_class, "int8_flags": c.relevant_flags(),
            "flags_source": c.source, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": {"darkconv": darkconv.__version__, "onnxruntime": onnxruntime.__version__,
                         "onnx": onnx.__version__, "torch": torch.__version__, "opencv": cv2.__version__}}


class OpenCVDNN:
    def __init__(self, cfg, weights, threads):
        import cv2

        cv2.setNumThreads(threads)
        self.net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.outs = self.net.getUnconnectedOutLayersNames()

    def run(self, x):
        self.net.setInput(x)
        return self.net.forward(self.outs)


def timed(sessions: dict, x, rounds, iters):
    for run in sessions.values():
        run(x)
    samples = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, run in sessions.items():
            time.sleep(0.1)
            run(x)
            for _ in range(iters):
                t0 = time.perf_counter()
                run(x)
                samples[k].append(time.perf_counter() - t0)
    return {k: {"p50_ms": float(np.median(v) * 1e3), "min_ms": float(np.min(v) * 1e3), "calls": len(v)}
            for k, v in samples.items()}


def ort_runner(proto, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {"images": x})


def diff_at(ev: I.Evaluator, heads) -> DetectionDiff:
    ref = postprocess(ev.ref_heads, ev.spec, ev.sizes, thresh=0.25)
    got = postprocess(heads, ev.spec, ev.sizes, thresh=0.25)
    d = DetectionDiff()
    for a, b in zip(ref, got):
        d.add(compare_detections(a, b))
    return d


def bench_model(name, args, work):
    files = zoo.fetch(name, log=log)
    model = darkconv.load(files.cfg, files.weights)
    spec = model.spec
    fp32 = to_onnx_model(model)
    fp32_path = work / f"{name}.onnx"
    onnx.save(fp32, fp32_path)
    A = sorted(DATA.glob("*.jpg"))
    B = zoo.fetch_images("photos", log=log)
    folds = [("A->B", A, B), ("B->A", B, A)]
    res = {"model": name, "cfg": files.cfg.name, "weights_sha256": sha256_file(files.weights), "folds": {},
           "accuracy": [], "latency": {}, "mixed": [], "calibration_s": {}}
    with cpu_lock(False):
        evs = {}
        for tag, cal, chk in folds:
            evs[tag] = I.Evaluator(spec, [load_image(p) for p in chk], [p.name for p in chk], fp32, args.threads)
            res["folds"][tag] = {"calib": [p.name for p in cal], "check": [p.name for p in chk],
                                 "truths": evs[tag].truths}
            log(f"{name} fold {tag}: {len(cal)} calibration images, {len(chk)} check images, "
                f"{evs[tag].truths} FP32 detections > 0.25")
        calibs = {}
        for method in args.methods:
            for rname in args.recipes:
                r = qz.recipe(rname)
                row = {"recipe": rname, "method": method, "folds": {}}
                ref_all, test_all = [], []
                for tag, cal, _ in folds:
                    key = (method, r.symmetric_activations, tag)
                    if key not in calibs:
                        d = work / f"{name}-{method}-{int(r.symmetric_activations)}-{tag.replace('>', '')}"
                        d.mkdir(exist_ok=True)
                        t0 = time.perf_counter()
                        calibs[key] = qz.calibrate(fp32_path, spec, cal, method=method,
                                                   symmetric=r.symmetric_activations, workdir=d)
                        res["calibration_s"][f"{method}/{'sym' if r.symmetric_activations else 'asym'}/{tag}"] = \
                            time.perf_counter() - t0
                    q = qz.build_qdq(fp32_path, r, calibs[key], workdir=work)
                    ev = evs[tag]
                    heads = ev.heads(q)
                    a, e = ev.score(heads)
                    dd = diff_at(ev, heads)
                    row["folds"][tag] = {"agreement": a, "head_err": e, "matched": dd.matched, "lost": dd.lost,
                                         "new": dd.new, "max_dscore": dd.max_dscore}
                    ref_all += ev.reference
                    test_all += ev.detections(heads)
                row["pooled_agreement"] = I.agreement(ref_all, test_all, spec.classes)
                res["accuracy"].append(row)
                log(f"{name} {method:10s} {rname:14s} pooled agreement {row['pooled_agreement']:.4f}, "
                    + ", ".join(f"{t}: {v['agreement']}" for t, v in row["folds"].items()))
        # mixed precision where the full-INT8 model misses the budget (fold with the most truths)
        tag = max(evs, key=lambda t: evs[t].truths)
        cal, chk = next((c, k) for t, c, k in folds if t == tag)
        mixed_protos = {}
        for rname in args.recipes:
            r = qz.recipe(rname)
            row = next(x for x in res["accuracy"] if x["recipe"] == rname and x["method"] == qz.default_method(r.target))
            if row["folds"][tag]["agreement"] is None or row["folds"][tag]["agreement"] >= BUDGET:
                continue
            log(f"{name} {rname}: mixed precision to reach {BUDGET} on fold {tag}")
            t0 = time.perf_counter()
            q, out = I.convert_int8(model, fp32, spec, cal, chk, recipe_name=rname, target=r.target, budget=BUDGET,
                                    threads=args.threads, timing=False, log=log)
            mixed_protos[rname] = q
            res["mixed"].append({"recipe": rname, "fold": tag, "budget": BUDGET, "agreement_all": out.agreement_all,
                                 "agreement": out.agreement, "float_layers": out.float_layers, "tries": out.tries,
                                 "sensitivity_s": out.sensitivity_s, "wall_s": time.perf_counter() - t0})
    # latency: one model per recipe (default method, calibrated on B), FP32, OpenCV; exclusive lock
    protos = {"fp32": fp32}
    for rname in args.recipes:
        r = qz.recipe(rname)
        key = (qz.default_method(r.target), r.symmetric_activations, "B->A")
        if key in calibs:
            protos[rname] = qz.build_qdq(fp32_path, r, calibs[key], workdir=work)
    for rname, q in mixed_protos.items():
        protos[f"{rname}+mixed"] = q
    x = evs["B->A"].x[:1]
    with cpu_lock(True, f"{name} timing"):
        res["load_avg"] = list(os.getloadavg())
        log(f"{name}: timing {len(protos) + 1} models (exclusive lock), load {res['load_avg'][0]:.2f}")
        runners = {k: ort_runner(p, args.threads) for k, p in protos.items()}
        runners["opencv"] = OpenCVDNN(files.cfg, files.weights, args.threads).run
        res["latency"] = timed(runners, x, args.rounds, args.iters)
    fp, cv = res["latency"]["fp32"]["p50_ms"], res["latency"]["opencv"]["p50_ms"]
    for k, v in res["latency"].items():
        v["vs_fp32"], v["vs_opencv"] = v["p50_ms"] / fp, v["p50_ms"] / cv
    log(f"{name}: " + ", ".join(f"{k} {v['p50_ms']:.1f} ms ({v['vs_fp32']:.2f}x)" for k, v in res["latency"].items()))
    return res


def bench_sensitivity_cost(args, work):
    """Wall time of the per-conv probe on a random-weight yolov4 (110 convs) at 416, 2 check images."""
    import torch

    with cpu_lock(False, "yolov4 sensitivity"):
        t0 = time.perf_counter()
        m = darkconv.load(ROOT / "cfg" / "yolov4.cfg", width=416, height=416).randomize(0)
        imgs = [load_image(p) for p in sorted(DATA.glob("*.jpg"))]
        from darkconv.preprocess import preprocess_batch
        m.normalize_activations(torch.from_numpy(preprocess_batch(imgs[:2], (416, 416), False)))
        with torch.no_grad():  # random heads "detect" ~10^5 boxes: objectness off (timing only, no agreement)
            for h in m.spec.heads:
                c = m.layers[h.layer - 1].conv
                c.weight[4::5 + h.classes] = 0.0
                c.bias[4::5 + h.classes] = -8.0
        fp32 = to_onnx_model(m)
        path = work / "yolov4.onnx"
        onnx.save(fp32, path)
        cal = qz.calibrate(path, m.spec, imgs[:3], method="percentile", workdir=work)
        t1 = time.perf_counter()
        ev = I.Evaluator(m.spec, imgs[3:5], ["a", "b"], fp32, args.threads)
        t2 = time.perf_counter()
        rows = I.sensitivity(m, fp32, cal, qz.recipe("u8s8-rr"), ev)
        t3 = time.perf_counter()
    return {"model": "yolov4 (random weights, normalized activations)", "size": 416, "convs": len(rows),
            "check_images": 2, "setup_s": t1 - t0, "fp32_reference_s": t2 - t1, "probe_s": t3 - t2,
            "mode": "only (each conv alone quantized, FP32 prefix reused)", "torch_threads": torch.get_num_threads()}


def markdown(doc) -> str:
    env = doc["environment"]
    L = ["# INT8 recipes: held-out agreement and latency", "",
         f"- **Machine**: {env['cpu_model']} ({env['arch']}), {env['cores']} cores, INT8-relevant flags: "
         f"{', '.join(env['int8_flags']) or 'none'} (from {env['flags_source']}; no avx512*, no *vnni, no amx*) "
         f"-> CPU class `{env['cpu_class']}`",
         f"- **Software**: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
         f"- **Run**: {doc['created']}, `{doc['command']}`, {doc['wall_s']:.0f} s; ONNX Runtime CPU, "
         f"{doc['threads']} threads, batch 1; latency = median of interleaved rounds under the exclusive CPU lock",
         "- **Held out**: A = 5 bundled images, B = 8 zoo photos; fold A->B calibrates on A and judges B, B->A the "
         "reverse; *pooled* = agreement over all 13 images, each judged by a model not calibrated on it",
         "- **agreement** = Darknet `detector map` AP@0.5 of INT8 detections (thresh 0.005) vs FP32 detections > 0.25, "
         "mean over classes with truths; lost/new/max|Δscore| at thresh 0.25",
         "- **CPU lock** (TEAM.md): " + "; ".join(f"{k}: {v}" for k, v in doc.get("cpu_lock", {}).items()), ""]
    for m in doc["models"]:
        L += [f"## {m['model']}", "",
              "Truths (FP32 detections > 0.25) per fold: " + ", ".join(
                  f"{t} {f['truths']} on {len(f['check'])} images" for t, f in m["folds"].items()), "",
              "| method | recipe | pooled agreement | A->B | B->A | lost/new (A->B, B->A) | max abs dscore | head err |",
              "|---|---|---:|---:|---:|---|---:|---:|"]
        for r in m["accuracy"]:
            f = r["folds"]
            fa, fb = f["A->B"], f["B->A"]
            L.append(f"| {r['method']} | {r['recipe']} | {r['pooled_agreement']:.4f} | {fmt(fa['agreement'])} | "
                     f"{fmt(fb['agreement'])} | {fa['lost']}/{fa['new']}, {fb['lost']}/{fb['new']} | "
                     f"{max(fa['max_dscore'], fb['max_dscore']):.3f} | {(fa['head_err'] + fb['head_err']) / 2:.4f} |")
        L += ["", "| model | p50 ms | vs FP32 | vs OpenCV DNN |", "|---|---:|---:|---:|"]
        for k, v in m["latency"].items():
            L.append(f"| {k} | {v['p50_ms']:.1f} | {v['vs_fp32']:.2f}x | {v['vs_opencv']:.2f}x |")
        if m["mixed"]:
            L += ["", f"Mixed precision (budget {BUDGET}, default calibration method):", ""]
            for x in m["mixed"]:
                L.append(f"- {x['recipe']} on fold {x['fold']}: agreement {fmt(x['agreement_all'])} -> "
                         f"{fmt(x['agreement'])} with Darknet layers {x['float_layers']} float; tries {x['tries']}; "
                         f"sensitivity {x['sensitivity_s']:.1f} s, total {x['wall_s']:.1f} s")
        L += ["", "Calibration time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in m["calibration_s"].items()), ""]
    s = doc.get("sensitivity_cost")
    if s:
        L += ["## Sensitivity cost on a big model", "",
              f"{s['model']} at {s['size']}x{s['size']}, {s['convs']} convs, {s['check_images']} check images, "
              f"mode {s['mode']}, torch {s['torch_threads']} threads: probes {s['probe_s']:.0f} s "
              f"(setup: export + calibration {s['setup_s']:.0f} s, FP32 reference {s['fp32_reference_s']:.0f} s).", ""]
    return "\n".join(L)


def fmt(v):
    return "-" if v is None else f"{v:.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="yolov3-tiny,yolov4-tiny-10")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--no-yolov4", action="store_true", help="skip the yolov4 sensitivity-cost run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.recipes, args.methods, args.no_yolov4, args.rounds = "u8s8,u8s8-rr", "percentile", True, 2
    args.recipes = args.recipes.split(",")
    args.methods = args.methods.split(",")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="bench-int8-")) if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    doc = {"created": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "threads": args.threads, "environment": environment(), "models": []}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            doc["models"].append(bench_model(name, args, work))
        if not args.no_yolov4:
            log("yolov4 sensitivity cost")
            doc["sensitivity_cost"] = bench_sensitivity_cost(args, work)
    doc["wall_s"] = time.perf_counter() - t0
    doc["cpu_lock"] = LOCK_STATE
    (out_dir / "bench_int8.json").write_text(json.dumps(doc, indent=1, default=str))
    (out_dir / "bench_int8.md").write_text(markdown(doc))
    log(f"wrote {out_dir / 'bench_int8.md'} and .json")


if __name__ == "__main__":
    main()
