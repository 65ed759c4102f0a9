"""``darkconv eval`` throughput against pure inference throughput, in one run (issue #9: eval >= 0.85x).

Builds a folder of N JPEGs (default 300) from the bundled samples (resized 0.6-1.4x, half of them
mirrored; YOLO labels transformed with them) under /tmp, converts the default yolov3-tiny to an FP32
ONNX, then, per batch size, alternately:

* pure inference: ``runner.infer`` on one fixed, already preprocessed batch, for as many images as the
  folder holds (images/s);
* eval: ``darkconv.evaluate(onnx, folder)`` -- decode + Darknet preprocessing (overlapped with
  inference), inference, both postprocessor passes (map 0.005/0.45 and detector-valid 0.001/0.6), Darknet
  mAP and COCO metrics; images/s over the detection loop and over the whole call.

Each measurement is repeated ``--rounds`` times, interleaved, and the best round of each is compared
(the machine is shared: the best is the least disturbed). Writes ``results/bench_eval.{md,json}``.

    python3 benchmarks/bench_eval.py [--images 200] [--runs 1x0,4x0,1x1] [--rounds 2] [--lock-wait 600]

It takes the exclusive CPU lock itself (bounded wait, recorded in the results).

``--runs``: BATCHxTHREADS pairs (threads 0 = all cores). With all cores given to inference, decode and
preprocessing can only take CPU time from it; with one inference thread on a 2-core machine, the other
core does the decoding, which shows whether the overlap keeps inference fed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import darkconv  # noqa: E402
from darkconv.bench import environment  # noqa: E402
from darkconv.datasets import read_label_file  # noqa: E402
from darkconv.pipeline import DATA, open_runner  # noqa: E402
from darkconv.preprocess import load_image, preprocess_batch  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_e2e import cpu_lock, lscpu_flags  # noqa: E402

GOAL = 0.85


def make_folder(out: Path, n: int) -> Path:
    """``n`` JPEGs (+ YOLO labels) from the bundled samples: scaled 0.6-1.4x, every other one mirrored."""
    import cv2

    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.glob("*.jpg"))) == n:
        return out
    for f in out.glob("*"):
        f.unlink()
    rng = np.random.default_rng(0)
    samples = sorted(DATA.glob("*.jpg"))
    for k in range(n):
        src = samples[k % len(samples)]
        im = cv2.imread(str(src))
        s = rng.uniform(0.6, 1.4)
        im = cv2.resize(im, (max(32, int(im.shape[1] * s)), max(32, int(im.shape[0] * s))),
                        interpolation=cv2.INTER_AREA)
        truth, _ = read_label_file(src.with_suffix(".txt"))
        boxes = truth.boxes.copy()
        if k % 2:
            im = im[:, ::-1]
            boxes[:, 0] = 1 - boxes[:, 0]
        name = out / f"{k:06d}.jpg"
        cv2.imwrite(str(name), np.ascontiguousarray(im), [cv2.IMWRITE_JPEG_QUALITY, 90])
        name.with_suffix(".txt").write_text("".join(f"{c} {b[0]:.6f} {b[1]:.6f} {b[2]:.6f} {b[3]:.6f}\n"
                                                    for c, b in zip(truth.class_ids, boxes)))
    return out


def pure_inference(onnx, n: int, batch: int, threads) -> dict:
    """Images/s of ``runner.infer`` alone on a fixed preprocessed batch (after 3 warm-up calls)."""
    with open_runner(onnx, threads=threads) as r:
        spec = r.spec
        ims = [load_image(p) for p in sorted(DATA.glob("*.jpg"))]
        x = preprocess_batch([ims[i % len(ims)] for i in range(batch)], (spec.width, spec.height), spec.letter_box)
        for _ in range(3):
            r.infer(x)
        calls = max(1, n // batch)
        t0 = time.perf_counter()
        for _ in range(calls):
            r.infer(x)
        dt = time.perf_counter() - t0
    return {"images": calls * batch, "seconds": dt, "images_per_s": calls * batch / dt}


def eval_run(onnx, folder: Path, batch: int, threads) -> dict:
    t0 = time.perf_counter()
    res = darkconv.evaluate(onnx, None, [folder], batch=batch, threads=threads)
    wall = time.perf_counter() - t0
    t = res.timings
    n = res.dataset["images"]
    return {"images": n, "detect_s": t["detect_s"], "total_s": wall, "images_per_s": n / t["detect_s"],
            "images_per_s_total": n / wall, "stages_ms_per_image": {k: t[k] / n * 1e3 for k in
                                                                  ("decode", "preprocess", "inference", "postprocess")},
            "map_s": t["map_s"], "coco_s": t["coco_s"], "load_s": t["load_s"], "map": res.map.map,
            "map_gt": res.map.map_gt, "coco_ap": res.coco["stats"]["AP"] if res.coco else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--runs", default="1x0,4x0,1x1", help="BATCHxTHREADS pairs, threads 0 = all cores")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--folder", default="/tmp/darkconv-bench-eval/images")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--lock-wait", type=float, default=600,
                    help="seconds to wait for the exclusive CPU lock before timing anyway (recorded); -1 = do not take it")
    args = ap.parse_args(argv)
    from darkconv.export.onnx import export_onnx
    from darkconv.zoo import default_model

    files = default_model(log=print)
    folder = make_folder(Path(args.folder), args.images)
    onnx = Path(args.folder).parent / "yolov3-tiny.onnx"
    if not onnx.exists():
        export_onnx(darkconv.load(files.cfg, files.weights), onnx)
    runs = [tuple(int(v) for v in r.split("x")) for r in args.runs.split(",")]
    rows = []
    lock = cpu_lock(args.lock_wait).__enter__()
    print(f"CPU lock: {lock.state}", flush=True)
    for b, th in runs:
        threads = th or None
        inf, ev = [], []
        for k in range(args.rounds):
            inf.append(pure_inference(onnx, args.images, b, threads))
            ev.append(eval_run(onnx, folder, b, threads))
            print(f"batch {b} threads {th or 'all'} round {k + 1}: inference {inf[-1]['images_per_s']:.1f} img/s, "
                  f"eval {ev[-1]['images_per_s']:.1f} img/s (whole call {ev[-1]['images_per_s_total']:.1f})", flush=True)
        best_inf = max(inf, key=lambda r: r["images_per_s"])
        best_ev = max(ev, key=lambda r: r["images_per_s"])
        rows.append({"batch": b, "threads": threads, "inference": inf, "eval": ev,
                     "ratio": best_ev["images_per_s"] / best_inf["images_per_s"],
                     "ratio_total": max(r["images_per_s_total"] for r in ev) / best_inf["images_per_s"]})
    lock.__exit__(None, None, None)
    env = environment(None)
    result = {"cpu_lock": lock.state, "lscpu": lscpu_flags(), "schema": "darkconv.bench_eval/1", "images": args.images, "folder": str(folder), "model": "yolov3-tiny "
              "(COCO, FP32 ONNX) on onnxruntime", "goal": GOAL, "rows": rows, "environment": env,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# darkconv eval vs pure inference ({result['time']})", "",
             f"Machine: {env['cpu_model']}, {env['cpu_cores']} cores, SIMD {', '.join(env['cpu_features'])}; "
             f"load average at the end {env['load_avg_1_5_15']}; onnxruntime {env['versions']['onnxruntime']}.",
             f"lscpu: {result['lscpu']}", f"CPU lock: {lock.state}.", "",
             f"{args.images} JPEGs (bundled samples resized 0.6-1.4x, half mirrored, with YOLO labels), "
             "yolov3-tiny FP32 ONNX on onnxruntime. Pure inference: `runner.infer` on a fixed preprocessed batch. "
             "Eval: `darkconv.evaluate` (decode + Darknet preprocessing in `pipeline.stream_runs` workers overlapped with inference, both postprocessor "
             "passes, Darknet mAP, COCO metrics). Best of "
             f"{args.rounds} interleaved rounds each.", "",
             "| batch | inference threads | inference img/s | eval img/s (detection loop) | ratio | eval img/s (whole call) | ratio | "
             "decode / preprocess / inference / postprocess ms per image (eval) | goal >= 0.85 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bi = max(r["inference"], key=lambda x: x["images_per_s"])
        be = max(r["eval"], key=lambda x: x["images_per_s"])
        st = be["stages_ms_per_image"]
        lines.append(f"| {r['batch']} | {r['threads'] or 'all'} | {bi['images_per_s']:.1f} | {be['images_per_s']:.1f} | {r['ratio']:.2f} | "
                     f"{max(x['images_per_s_total'] for x in r['eval']):.1f} | {r['ratio_total']:.2f} | "
                     f"{st['decode']:.1f} / {st['preprocess']:.1f} / {st['inference']:.1f} / {st['postprocess']:.1f} | "
                     f"{'met' if r['ratio'] >= GOAL else 'missed'} |")
    be = rows[0]["eval"][0]
    lines += ["", f"Figures of the run: Darknet mAP@0.50 {be['map'] * 100:.2f} % (80 classes), over the classes with "
              f"objects {be['map_gt'] * 100:.2f} %, COCO AP {be['coco_ap'] * 100:.2f} %. Stage times overlap (decode "
              "and preprocessing run in worker threads), so they do not add up to the wall time.", ""]
    (out / "bench_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
