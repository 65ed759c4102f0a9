"""Detect on a folder (decode -> Darknet preprocessing -> inference -> postprocessing) against pure inference
throughput, in one run (issue #12: end to end >= 0.85x of pure inference).

Builds a folder of N JPEGs (default 300) from the bundled samples (scaled 0.5-1.6x, so sizes vary, every
other one mirrored) under /tmp, converts the default yolov3-tiny to an FP32 ONNX and opens it twice on
onnxruntime: one lane on every thread (lowest latency) and ``default_lanes`` lanes of one thread each (what
``darkconv detect`` runs on files). Then, per batch size, interleaved:

* pure inference, both ways: ``runner.infer`` on one fixed, already preprocessed batch, as many images as
  the folder (the lanes runner called from one thread per lane); the better of the two is the baseline;
* stream: ``pipeline.stream_detect`` over the folder's files (decoded in the preprocessing workers, the
  compiled Darknet resize, inference, postprocessing; every result consumed) -- what ``darkconv detect
  FOLDER`` runs, without drawing or printing -- on the lanes runner, and on the one-lane runner;
* sequential (reference, batch 1 only): ``load_image`` + ``detect_arrays`` one image after the other.

Each measurement is repeated ``--rounds`` times and the best round of each is compared (the machine is
shared: the best is the least disturbed); process CPU time per image is recorded beside each. Writes
``results/bench_e2e.{md,json}``.

    python3 benchmarks/bench_e2e.py [--images 300] [--batches 1,4] [--rounds 3] [--lock-wait 600]

It takes the exclusive CPU lock (/tmp/darkconv-cpu.lock) itself, waiting at most ``--lock-wait`` seconds;
whether it was held is written into the results.
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
from darkconv.pipeline import DATA, default_lanes, default_workers, detect_arrays, open_runner, stream_detect  # noqa: E402
from darkconv.preprocess import list_images, load_image, preprocess_batch  # noqa: E402
from darkconv.sources import ImageFileFrame  # noqa: E402


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def make_folder(out: Path, n: int) -> Path:
    """``n`` JPEGs from the bundled samples, scaled 0.5-1.6x (varied sizes), every other one mirrored."""
    import cv2

    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.glob("*.jpg"))) == n:
        return out
    for f in out.glob("*"):
        f.unlink()
    rng = np.random.default_rng(1)
    samples = sorted(DATA.glob("*.jpg"))
    for k in range(n):
        im = cv2.imread(str(samples[k % len(samples)]))
        sx, sy = rng.uniform(0.5, 1.6, 2)
        im = cv2.resize(im, (max(32, int(im.shape[1] * sx)), max(32, int(im.shape[0] * sy))),
                        interpolation=cv2.INTER_AREA)
        if k % 2:
            im = im[:, ::-1]
        cv2.imwrite(str(out / f"{k:06d}.jpg"), np.ascontiguousarray(im), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return out


def fixed_batch(spec, batch: int) -> np.ndarray:
    ims = [load_image(p) for p in sorted(DATA.glob("*.jpg"))]
    return preprocess_batch([ims[i % len(ims)] for i in range(batch)], (spec.width, spec.height), spec.letter_box)


def pure(runner, x, n: int) -> dict:
    c0 = cpu_seconds()
    r = pure_inference(runner, x, n)
    r["cpu_ms_per_image"] = (cpu_seconds() - c0) / r["images"] * 1e3
    return r


def stream(runner, files, batch: int, workers) -> dict:
    from darkconv.pipeline import Timings

    t = Timings()
    boxes = 0
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    for _frame, det in stream_detect(runner, (ImageFileFrame(i, p) for i, p in enumerate(files)), batch=batch,
                                     workers=workers, timings=t):
        if isinstance(det, BaseException):
            raise det
        boxes += len(det.scores)
    dt = time.perf_counter() - t0
    n = len(files)
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "detections": boxes,
            "cpu_ms_per_image": (cpu_seconds() - c0) / n * 1e3,
            "stages_ms_per_image": {k: getattr(t, k) / n * 1e3 for k in ("decode", "preprocess", "inference",
                                                                       "postprocess")}}


def sequential(runner, files) -> dict:
    boxes = 0
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    for p in files:
        boxes += len(detect_arrays(runner, [load_image(p)])[0].scores)
    dt = time.perf_counter() - t0
    return {"images": len(files), "seconds": dt, "images_per_s": len(files) / dt, "detections": boxes,
            "cpu_ms_per_image": (cpu_seconds() - c0) / len(files) * 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batches", default="1,4", help="batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="inference threads (0 = all cores)")
    ap.add_argument("--folder", default="/tmp/darkconv-bench-e2e/images")
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

    files_model = default_model(log=print)
    folder = make_folder(Path(args.folder), args.images)
    files = list_images(folder)
    onnx = Path(args.folder).parent / "yolov3-tiny.onnx"
    if not onnx.exists():
        export_onnx(darkconv.load(files_model.cfg, files_model.weights), onnx)
    threads = args.threads or None
    lanes = default_lanes("onnxruntime", threads=threads)
    rows = []
    lock = cpu_lock(args.lock_wait)
    with lock, open_runner(onnx, threads=threads) as one, open_runner(onnx, threads=threads, lanes=lanes) as many:
        print(f"CPU lock: {lock.state}; load average {os.getloadavg()}; resize kernel {preprocess.kernel()}; "
              f"{lanes} lanes", flush=True)
        cpu0 = host_cpu()
        for b in (int(v) for v in args.batches.split(",")):
            x = fixed_batch(one.spec, b)
            m = {k: [] for k in ("pure_1", "pure_lanes", "stream_lanes", "stream_1", "sequential")}
            for k in range(args.rounds):
                m["pure_1"].append(pure(one, x, args.images))
                m["pure_lanes"].append(pure(many, x, args.images))
                m["stream_lanes"].append(stream(many, files, b, None))
                m["stream_1"].append(stream(one, files, b, None))
                if b == 1:
                    m["sequential"].append(sequential(one, files))
                print(f"batch {b} round {k + 1}: " + ", ".join(f"{key} {v[-1]['images_per_s']:.1f}"
                                                             for key, v in m.items() if v) + " img/s", flush=True)
            rows.append({"batch": b, "lanes": lanes, "workers": default_workers(), **m, **figures(m)})
        steal = steal_share(cpu0, host_cpu())
    env = environment(None)
    sizes = sorted({load_image(p).shape[:2] for p in files[:24]})
    result = {"schema": "darkconv.bench_e2e/2", "images": args.images, "folder": str(folder),
              "model": "yolov3-tiny (COCO, FP32 ONNX) on onnxruntime", "inference_threads": args.threads or "all",
              "lanes": lanes, "rounds": args.rounds, "sizes": [list(sizes[0]), list(sizes[-1])],
              "resize_kernel": preprocess.kernel(), "goal": GOAL, "rows": rows, "environment": env,
              "lscpu": lscpu_flags(), "cpu_lock": lock.state, "host_steal": steal,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, out)


def figures(m: dict) -> dict:
    """The ratios of one batch size from its rounds. Headline: the median over the rounds of the stream's images/s
    over the baseline configuration's (:func:`_common.baseline_key`) in the same round."""
    key = baseline_key(m)
    base = best(m[key])
    return {"baseline": key, "baseline_images_per_s": base, "paired": paired(m["stream_lanes"], m[key]),
            "paired_one_lane": paired(m["stream_1"], m[key]),
            "paired_sequential": paired(m["sequential"], m[key]) if m["sequential"] else None,
            "ratio": best(m["stream_lanes"]) / base,
            "ratio_best_of_both": best(m["stream_lanes"]) / max(best(m["pure_1"]), best(m["pure_lanes"])),
            "ratio_one_lane": best(m["stream_1"]) / base,
            "ratio_sequential": best(m["sequential"]) / base if m["sequential"] else None}


def write_report(result: dict, out: Path) -> None:
    """``bench_e2e.md`` from the results (``--from-json`` writes it again from a saved JSON, also an older one)."""
    rows = result["rows"]
    (h0, w0), (h1, w1) = result["sizes"]

    def fig(rounds):
        r = max(rounds, key=lambda x: x["images_per_s"])
        return f"{r['images_per_s']:.1f} ({r['cpu_ms_per_image']:.1f})"

    lines = [f"# detect on a folder vs pure inference ({result['time']})", "", *machine_lines(result), "",
             f"{result['images']} JPEGs (bundled samples scaled 0.5-1.6x per axis, e.g. {w0}x{h0} to {w1}x{h1}), "
             f"yolov3-tiny FP32 ONNX on onnxruntime, inference threads {result['inference_threads']}, resize kernel "
             f"`{result['resize_kernel']}`. Two runners: one lane on every thread, and {result['lanes']} lanes of one "
             "thread each (`darkconv detect`'s default on files). Pure inference: `runner.infer` on a fixed "
             "preprocessed batch (the lanes runner called from one thread per lane); the baseline is the configuration "
             "with the higher median over the rounds. Stream: `pipeline.stream_detect` over the files (decode + exact "
             "Darknet resize in the preprocessing worker, inference, postprocessing at thresh 0.25, every result "
             "consumed). Sequential: decode, preprocess, infer, postprocess one image after the other. "
             f"{result['rounds']} interleaved rounds; images/s of the best round of each, with process CPU ms per image "
             "in brackets. **Paired ratio** (the headline): the median over the rounds of the stream's images/s over "
             "the baseline's in the same round, measured back to back (min - max in brackets). Best rounds: the best "
             "round over the baseline's best round; the last column compares it with the better of both "
             "configurations' best rounds instead, a maximum over twice as many noisy measurements (the statistic of "
             "earlier records).", "",
             "| batch | pure inference, 1 lane | pure inference, lanes | baseline | stream, lanes | **paired ratio** | "
             "best rounds | stream, 1 lane: paired ratio | sequential: paired ratio | decode / preprocess / inference / "
             f"postprocess ms per image (stream, lanes) | goal >= {result['goal']} | vs the better of both best rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = figures(r)
        bs = max(r["stream_lanes"], key=lambda x: x["images_per_s"])
        s = bs["stages_ms_per_image"]
        lines.append(f"| {r['batch']} | {fig(r['pure_1'])} | {fig(r['pure_lanes'])} | "
                     f"{'lanes' if f['baseline'] == 'pure_lanes' else '1 lane'} | {fig(r['stream_lanes'])} | "
                     f"**{paired_text(f['paired'])}** | {f['ratio']:.3f} | {paired_text(f['paired_one_lane'])} | "
                     f"{paired_text(f['paired_sequential'])} | "
                     f"{s['decode']:.1f} / {s['preprocess']:.1f} / {s['inference']:.1f} / {s['postprocess']:.1f} | "
                     f"{'met' if f['paired']['median'] >= result['goal'] else 'missed'} | "
                     f"{f['ratio_best_of_both']:.3f} |")
    lines += ["", "Stage times are summed over threads that overlap (inference over the lanes), so they do not add up "
              "to the wall time. The difference in CPU ms per image between the stream and pure inference is what "
              "decoding, resizing, postprocessing and the pipeline cost; on a machine whose cores inference already "
              "uses, it can only come out of inference's share.", ""]
    (out / "bench_e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
