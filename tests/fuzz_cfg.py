"""Seeded cfg fuzzing: mutants of the bundled cfgs must load or fail with a DarkconvError, within a memory cap.

Mutations (1-3 per mutant, as in issue #13's campaign): delete, duplicate or swap lines; replace
a number (0, negatives, 2^31, 10^1..10^30, 6,000 digits, floats, inf); rename a section or a
key (typos, keys of other sections); truncate the text; insert a NUL byte.

Each mutant is parsed, checked and built with ``DarknetModel(cfg, init=False)`` (real, uninitialised
allocations), in a worker process whose address space is capped (``RLIMIT_AS``) with darkconv's memory
limits set below the cap: an allocation darkconv did not foresee fails the case instead of swapping.
Every loaded model of a small cfg also runs a forward pass at 64x64 (or fails with a DarkconvError
when its geometry does not fit that size), checking that the built modules produce the planned shapes.

Run more mutants by hand: ``python tests/fuzz_cfg.py --count 10000 --seed 7`` (prints a summary).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (cfg, weight): the small cfgs are drawn more often (a big one costs ~10x to build)
BASES = [("cfg/yolov2-tiny.cfg", 4), ("cfg/yolov3-tiny.cfg", 4), ("cfg/yolov4-tiny.cfg", 4),
         ("darkconv/data/yolov4-tiny-10.cfg", 3), ("cfg/yolov7-tiny.cfg", 2), ("cfg/yolov2.cfg", 1),
         ("cfg/yolov3.cfg", 1), ("cfg/yolov3-spp.cfg", 1), ("cfg/yolov4.cfg", 1), ("cfg/yolov4-csp.cfg", 1)]
SMALL = {"cfg/yolov2-tiny.cfg", "cfg/yolov3-tiny.cfg", "cfg/yolov4-tiny.cfg", "darkconv/data/yolov4-tiny-10.cfg"}
SECTIONS = ["net", "convolutional", "maxpool", "route", "shortcut", "upsample", "yolo", "region", "reorg",
            "connected", "softmax", "dropout", "avgpool", "local_avgpool", "batchnorm", "sam", "scale_channels",
            "activation", "empty", "reorg3d", "crop", "convolution", "lstm", "implicit_add"]
KEYS = ["filters", "size", "stride", "pad", "padding", "groups", "dilation", "activation", "batch_normalize",
        "layers", "from", "mask", "anchors", "classes", "num", "width", "height", "channels", "output",
        "temperature", "stride_x", "stride_y", "antialiasing", "scale_x_y", "new_coords", "group_id",
        "weights_type", "maxpool_depth", "out_channels", "letter_box", "coords", "softmax", "cbn", "scale"]
MEMORY_CAP = 3 << 30          # bytes of address space a case may add to the worker
WORKER_LIMITS = {"DARKCONV_MAX_WEIGHTS_GB": "0.6", "DARKCONV_MAX_ACTIVATIONS_GB": "1.5"}


def number(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind < 3:
        return str(rng.randint(-3, 64))
    if kind == 3:
        return str(10 ** rng.randint(1, 30))
    if kind == 4:
        return "9" * 6000
    if kind == 5:
        return rng.choice(["2147483647", "2147483648", "-2147483649", "1000000000", "1177791689", "-1000000000"])
    if kind == 6:
        return rng.choice(["0.5", "1e30", "1e-30", "-0.0", "3.5e38", "1e39", "inf", "nan", ".", ""])
    if kind == 7:
        return str(rng.randint(65, 5000))
    if kind == 8:
        return str(-10 ** rng.randint(1, 12))
    return str(rng.choice([0, 1, 2, 3, 5, 7, 13, 255, 416]))


def _typo(rng: random.Random, word: str) -> str:
    if len(word) < 2:
        return word + "x"
    i = rng.randrange(len(word) - 1)
    op = rng.randrange(3)
    if op == 0:
        return word[:i] + word[i + 1:]
    if op == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + rng.choice("aeiostx_") + word[i:]


def mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        if not lines:
            break
        op = rng.randrange(9)
        i = rng.randrange(len(lines))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op in (3, 4):  # a number (the likeliest edit to matter)
            cand = [k for k, ln in enumerate(lines) if "=" in ln and re.search(r"\d", ln.split("=", 1)[1])]
            if cand:
                k = rng.choice(cand)
                key, value = lines[k].split("=", 1)
                items = value.split(",")
                items[rng.randrange(len(items))] = number(rng)
                lines[k] = key + "=" + ",".join(items)
        elif op == 5:
            cand = [k for k, ln in enumerate(lines) if ln.strip().startswith("[")]
            if cand:
                k = rng.choice(cand)
                name = lines[k].strip()[1:-1]
                lines[k] = "[" + (rng.choice(SECTIONS) if rng.random() < 0.6 else _typo(rng, name)) + "]"
        elif op == 6:
            cand = [k for k, ln in enumerate(lines) if "=" in ln]
            if cand:
                k = rng.choice(cand)
                key, value = lines[k].split("=", 1)
                lines[k] = (rng.choice(KEYS) if rng.random() < 0.5 else _typo(rng, key.strip())) + "=" + value
        elif op == 7:
            out = "\n".join(lines)
            return out[:rng.randrange(len(out) + 1)]
        else:
            ln = lines[i]
            k = rng.randrange(len(ln) + 1)
            lines[i] = ln[:k] + "\x00" + ln[k:]
    return "\n".join(lines) + "\n"


def mutants(seed: int, count: int):
    """(case id, base cfg, mutant text) for ``count`` mutants from ``seed`` (deterministic)."""
    rng = random.Random(seed)
    texts = {path: (ROOT / path).read_text() for path, _ in BASES}
    paths, weights = zip(*BASES)
    for case in range(count):
        base = rng.choices(paths, weights)[0]
        yield case, base, mutate(texts[base], rng)


# ------------------------------------------------------------------------------------ worker
def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(seed: int, count: int) -> None:
    """Run the cases and print one JSON line per case: {"case", "base", "outcome", "detail", "seconds"}."""
    import resource
    import time
    import warnings

    import torch

    sys.path.insert(0, str(ROOT))
    from darkconv.darknet.cfg import parse_cfg
    from darkconv.errors import DarkconvError
    from darkconv.graph.model import DarknetModel

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # unknown-key warnings are an expected outcome
    base_vm = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (base_vm + MEMORY_CAP, resource.RLIM_INFINITY))
    for case, base, text in mutants(seed, count):
        detail, t0 = "", time.perf_counter()
        try:
            model = DarknetModel(parse_cfg(f"mutant-{case}.cfg", text), init=False)
            outcome = "loaded"
            if base in SMALL and case % 4 == 0:
                try:
                    small = DarknetModel(parse_cfg(f"mutant-{case}.cfg", text), 64, 64, init=False)
                except DarkconvError:
                    pass
                else:
                    with torch.no_grad():
                        outs = small(torch.zeros(1, small.spec.channels, 64, 64))
                    got = [tuple(o.shape[1:]) for o in outs]
                    want = [small.shapes[h - 1] for h in small.head_layers]
                    if got != want:
                        outcome, detail = "FAIL", f"forward shapes {got} != planned {want}"
                    else:
                        outcome = "loaded+forward"
            del model
        except DarkconvError as e:
            outcome, detail = "error", type(e).__name__
            if "\n" in str(e):
                outcome, detail = "FAIL", f"multi-line message: {str(e)[:300]!r}"
        except BaseException as e:  # noqa: BLE001 - anything else is the bug this test hunts
            import traceback

            outcome, detail = "FAIL", f"{type(e).__name__}: {str(e)[:300]} | " + \
                traceback.format_exc(limit=-3).replace("\n", " | ")[:800]
        print(json.dumps({"case": case, "base": base, "outcome": outcome, "detail": detail,
                          "seconds": round(time.perf_counter() - t0, 4)}), flush=True)


def run(seed: int, count: int, timeout: float = 1800) -> tuple[Counter, list[dict], subprocess.CompletedProcess]:
    """Run the worker in a fresh process; returns outcome counts, the failing cases, and the process."""
    env = {**os.environ, **WORKER_LIMITS, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", "--seed", str(seed), "--count", str(count)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    counts = Counter(r["outcome"] for r in rows)
    return counts, [r for r in rows if r["outcome"] == "FAIL"], proc


def main() -> None:
    ap = argparse.ArgumentParser(description="fuzz darkconv's cfg loading with mutants of the bundled cfgs")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.seed, args.count)
        return
    import time

    t = time.perf_counter()
    counts, failures, proc = run(args.seed, args.count)
    print(f"{sum(counts.values())} of {args.count} mutants in {time.perf_counter() - t:.0f} s "
          f"(seed {args.seed}): {dict(counts)}; worker exit {proc.returncode}")
    for f in failures[:20]:
        print(json.dumps(f))
    if proc.returncode:
        print(proc.stderr[-2000:])
    sys.exit(1 if failures or proc.returncode or sum(counts.values()) != args.count else 0)


if __name__ == "__main__":
    main()
