"""``darkconv eval`` throughput against pure inference throughput, in one run (issue #9: eval >= 0.85x).

Builds a folder of N JPEGs (default 200) from the bundled samples (resized 0.6-1.4x, half of them
mirrored; YOLO labels transformed with them) under /tmp, converts the default yolov3-tiny to an FP32
ONNX, then, per batch size, alternately:

* pure inference, two ways: ``runner.infer`` on one fixed, already preprocessed batch, for as many images
  as the folder holds, on one lane using every thread and on ``default_lanes`` lanes of one thread each
  (called from one thread per lane); the better of the two is the baseline;
* eval: ``darkconv.evaluate(onnx, folder)`` with its default lanes and with one lane -- decode + Darknet
  preprocessing (overlapped with inference), inference, both postprocessor passes (map 0.005/0.45 and
  detector-valid 0.001/0.6), Darknet mAP and COCO metrics; images/s over the detection loop and over the
  whole call (model load, mAP and COCO metrics included).

Each measurement is repeated ``--rounds`` times, interleaved, and the best round of each is compared
(the machine is shared: the best is the least disturbed). Writes ``results/bench_eval.{md,json}``.

    python3 benchmarks/bench_eval.py [--images 200] [--batches 1,4] [--rounds 3] [--lock-wait 600]

It takes the exclusive CPU lock itself (bounded wait, recorded in the results).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import darkconv  # noqa: E402
from _common import (GOAL, baseline_key, best, cpu_lock, host_cpu, lscpu_flags, machine_lines, paired,  # noqa: E402
                     paired_text, pure_inference, steal_share)
from darkconv import preprocess  # noqa: E402
from darkconv.bench import environment  # noqa: E402
from darkconv.datasets import read_label_file  # noqa: E402
from darkconv.pipeline import DATA, default_lanes, open_runner  # noqa: E402
from darkconv.preprocess import load_image, preprocess_batch  # noqa: E402


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


def pure(onnx, n: int, batch: int, threads, lanes: int) -> dict:
    """Images/s of ``runner.infer`` alone on a fixed preprocessed batch, ``lanes`` calls at once."""
    with open_runner(onnx, threads=threads, lanes=lanes) as r:
        spec = r.spec
        ims = [load_image(p) for p in sorted(DATA.glob("*.jpg"))]
        x = preprocess_batch([ims[i % len(ims)] for i in range(batch)], (spec.width, spec.height), spec.letter_box)
        return pure_inference(r, x, n)


def eval_run(onnx, folder: Path, batch: int, threads, lanes) -> dict:
    t0 = time.perf_counter()
    res = darkconv.evaluate(onnx, None, [folder], batch=batch, threads=threads, lanes=lanes)
    wall = time.perf_counter() - t0
    t = res.timings
    n = res.dataset["images"]
    return {"images": n, "detect_s": t["detect_s"], "total_s": wall, "images_per_s": n / t["detect_s"],
            "images_per_s_total": n / wall, "stages_ms_per_image": {k: t[k] / n * 1e3 for k in
                                                                  ("decode", "preprocess", "inference", "postprocess")},
            "map_s": t["map_s"], "coco_s": t["coco_s"], "load_s": t["load_s"], "map": res.map.map,
            "map_gt": res.map.map_gt, "coco_ap": res.coco["stats"]["AP"] if res.coco else None,
            "lanes": res.settings["lanes"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batches", default="1,4", help="batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="inference threads (0 = all cores)")
    ap.add_argument("--folder", default="/tmp/darkconv-bench-eval/images")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--lock-wait", type=float, default=600,
                    help="seconds to wait for the exclusive CPU lock before timing anyway (recorded); -1 = do not take it")
    ap.add_argument("--from-json", metavar="JSON", help="write the report again from a saved results JSON (no timing)")
    args = ap.parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
        return write_report(json.loads(path.read_text()), path.parent)
    from darkconv.export.onnx import export_onnx
    from darkconv.zoo import default_model

    files = default_model(log=print)
    folder = make_folder(Path(args.folder), args.images)
    onnx = Path(args.folder).parent / "yolov3-tiny.onnx"
    if not onnx.exists():
        export_onnx(darkconv.load(files.cfg, files.weights), onnx)
    threads = args.threads or None
    lanes = default_lanes("onnxruntime", threads=threads)
    rows = []
    lock = cpu_lock(args.lock_wait).__enter__()
    print(f"CPU lock: {lock.state}; load average {os.getloadavg()}; resize kernel {preprocess.kernel()}; "
          f"{lanes} lanes", flush=True)
    cpu0 = host_cpu()
    for b in (int(v) for v in args.batches.split(",")):
        m = {k: [] for k in ("pure_1", "pure_lanes", "eval_lanes", "eval_1")}
        for k in range(args.rounds):
            m["pure_1"].append(pure(onnx, args.images, b, threads, 1))
            m["pure_lanes"].append(pure(onnx, args.images, b, threads, lanes))
            m["eval_lanes"].append(eval_run(onnx, folder, b, threads, None))
            m["eval_1"].append(eval_run(onnx, folder, b, threads, 1))
            print(f"batch {b} round {k + 1}: inference {m['pure_1'][-1]['images_per_s']:.1f} (1 lane) / "
                  f"{m['pure_lanes'][-1]['images_per_s']:.1f} ({lanes} lanes) img/s, eval "
                  f"{m['eval_lanes'][-1]['images_per_s']:.1f} (whole call {m['eval_lanes'][-1]['images_per_s_total']:.1f}) "
                  f"/ one lane {m['eval_1'][-1]['images_per_s']:.1f} img/s", flush=True)
        rows.append({"batch": b, "lanes": lanes, **m, **figures(m)})
    steal = steal_share(cpu0, host_cpu())
    lock.__exit__(None, None, None)
    env = environment(None)
    result = {"cpu_lock": lock.state, "lscpu": lscpu_flags(), "schema": "darkconv.bench_eval/2", "images": args.images,
              "folder": str(folder), "model": "yolov3-tiny (COCO, FP32 ONNX) on onnxruntime", "lanes": lanes,
              "inference_threads": args.threads or "all", "rounds": args.rounds, "resize_kernel": preprocess.kernel(),
              "goal": GOAL, "rows": rows, "environment": env, "host_steal": steal,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, out)


def figures(m: dict) -> dict:
    """The ratios of one batch size from its rounds. Headline: the median over the rounds of eval's images/s over
    the baseline configuration's (:func:`_common.baseline_key`) in the same round."""
    key = baseline_key(m)
    base = best(m[key])
    return {"baseline": key, "baseline_images_per_s": base,
            "paired": paired(m["eval_lanes"], m[key]),
            "paired_total": paired(m["eval_lanes"], m[key], "images_per_s_total"),
            "paired_one_lane": paired(m["eval_1"], m[key]),
            "ratio": best(m["eval_lanes"]) / base,
            "ratio_total": best(m["eval_lanes"], "images_per_s_total") / base,
            "ratio_best_of_both": best(m["eval_lanes"]) / max(best(m["pure_1"]), best(m["pure_lanes"])),
            "ratio_one_lane": best(m["eval_1"]) / base,
            "ratio_one_lane_total": best(m["eval_1"], "images_per_s_total") / base}


def _series(rounds) -> str:
    return ", ".join(f"{x['images_per_s']:.1f}" for x in rounds)


def write_report(result: dict, out: Path) -> None:
    """``bench_eval.md`` from the results (``--from-json`` writes it again from a saved JSON, also an older one)."""
    rows, goal_ = result["rows"], result["goal"]
    lines = [f"# darkconv eval vs pure inference ({result['time']})", "", *machine_lines(result), "",
             f"{result['images']} JPEGs (bundled samples resized 0.6-1.4x, half mirrored, with YOLO labels), "
             f"yolov3-tiny FP32 ONNX on onnxruntime, inference threads {result['inference_threads']}, resize kernel "
             f"`{result['resize_kernel']}`. Pure inference: `runner.infer` on a fixed preprocessed batch, on one lane "
             f"with every thread and on {result['lanes']} lanes of one thread each; the baseline is the configuration "
             "with the higher median over the rounds. Eval: `darkconv.evaluate` (decode + Darknet preprocessing in "
             "`pipeline.stream_runs` workers overlapped with inference, both postprocessor settings from one decode, "
             "Darknet mAP, COCO metrics) with its default lanes and with one lane; the detection loop, and the whole "
             f"call (model load, mAP, COCO metrics). {result['rounds']} interleaved rounds. **Paired ratio** (the "
             "headline): the median over the rounds of eval's images/s over the baseline's in the same round, measured "
             "back to back (min - max in brackets). Best rounds: the best round of eval over the best round of the "
             "baseline; the last column compares it with the better of both configurations' best rounds instead, a "
             "maximum over twice as many noisy measurements (the statistic of earlier records).", "",
             "| batch | pure inference img/s (best), 1 lane / lanes | baseline | eval img/s, detection loop (best) | "
             "**paired ratio, detection loop** | paired ratio, whole call | eval one lane: paired ratio | best rounds: "
             "loop / whole call | decode / preprocess / inference / postprocess ms per image (eval) | "
             f"goal >= {goal_} | loop vs the better of both best rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = figures(r)
        be = max(r["eval_lanes"], key=lambda x: x["images_per_s"])
        st = be["stages_ms_per_image"]
        loop, total, one = f["paired"], f["paired_total"], f["paired_one_lane"]
        goal = ("met" if total["median"] >= goal_ else "met (detection loop), missed (whole call)"
                if loop["median"] >= goal_ else "missed")
        lines.append(f"| {r['batch']} | {best(r['pure_1']):.1f} / {best(r['pure_lanes']):.1f} | "
                     f"{'lanes' if f['baseline'] == 'pure_lanes' else '1 lane'} | {be['images_per_s']:.1f} | "
                     f"**{paired_text(loop)}** | {paired_text(total)} | {one['median']:.2f} | "
                     f"{f['ratio']:.3f} / {f['ratio_total']:.3f} | "
                     f"{st['decode']:.1f} / {st['preprocess']:.1f} / {st['inference']:.1f} / {st['postprocess']:.1f} | "
                     f"{goal} | {f['ratio_best_of_both']:.3f} |")
    be = rows[0]["eval_lanes"][0]
    post = sorted((e["load_s"], e["map_s"], e["coco_s"]) for r in rows for e in r["eval_lanes"])[len(rows) // 2]
    lines += ["", f"Figures of the run: Darknet mAP@0.50 {be['map'] * 100:.2f} % (80 classes), over the classes with "
              f"objects {be['map_gt'] * 100:.2f} %, COCO AP {be['coco_ap'] * 100:.2f} % (the same in every run). "
              "Stage times overlap (decode and preprocessing run in worker threads, inference in lanes), so they do "
              f"not add up to the wall time. Outside the detection loop (a typical run): model load {post[0]:.2f} s, "
              f"Darknet mAP {post[1]:.2f} s, COCO metrics {post[2]:.2f} s, on one core.", "",
              "Per round (images/s): " + "; ".join(
                  f"batch {r['batch']}: pure 1 lane {_series(r['pure_1'])} | pure lanes {_series(r['pure_lanes'])} | "
                  f"eval {_series(r['eval_lanes'])}" for r in rows) + ".", ""]
    (out / "bench_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
