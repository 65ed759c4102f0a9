"""What the throughput benchmarks (bench_e2e.py, bench_eval.py) share: the exclusive CPU lock, the machine's
``lscpu`` line and the host's steal time, pure inference measured the two ways a CPU runs it (one call on every
thread, or one single-threaded call per lane at once), and how a pipeline is compared with it."""
from __future__ import annotations

import statistics
import subprocess
import threading
import time

LOCK = "/tmp/darkconv-cpu.lock"
GOAL = 0.85  # issues #9 and #12: end to end >= 0.85x of pure inference throughput


class cpu_lock:
    """The machine's exclusive CPU lock, taken by the benchmark itself with a bounded wait (shared holders can
    starve an exclusive waiter for a long time): ``.state`` records whether it was held while timing."""

    def __init__(self, wait_s: float):
        self.wait_s, self.state, self.fd = float(wait_s), "not requested", None

    def __enter__(self):
        import fcntl
        import os

        if self.wait_s < 0:
            return self
        self.fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.state = f"exclusive lock held (waited {time.monotonic() - t0:.0f} s)"
                return self
            except BlockingIOError:
                if time.monotonic() - t0 > self.wait_s:
                    self.state = (f"exclusive lock NOT acquired after {self.wait_s:.0f} s (other jobs held it "
                                  "shared): timed on a busy machine")
                    return self
                time.sleep(0.5)

    def __exit__(self, *exc):
        import fcntl
        import os

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def lscpu_flags() -> str:
    """``MODEL NAME; flags: ...`` from lscpu (INT8 and SIMD speed depend on them)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in text.splitlines() if ":" in ln}
    return f"{lines.get('Model name', '?')}; flags: {lines.get('Flags', '?')}"


def pure_inference(runner, x, n: int) -> dict:
    """Images/s of ``runner.infer(x)`` alone, ``n`` images' worth of calls after 2 warm-up calls, with
    ``runner.concurrency`` threads calling at once (each its share of the calls)."""
    lanes = max(1, int(getattr(runner, "concurrency", 1)))
    batch = x.shape[0]
    for _ in range(2):
        runner.infer(x)
    calls = max(lanes, n // batch) // lanes

    def loop():
        for _ in range(calls):
            runner.infer(x)

    threads = [threading.Thread(target=loop) for _ in range(lanes)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t0
    images = calls * lanes * batch
    return {"images": images, "seconds": dt, "images_per_s": images / dt, "lanes": lanes}


def best(rounds, key="images_per_s") -> float:
    return max(r[key] for r in rounds)


def baseline_key(m: dict, keys=("pure_1", "pure_lanes")) -> str:
    """The pure-inference configuration a pipeline is compared with: the one with the higher median over the rounds.

    Taking the better of both per round (or the better of both best rounds) would compare the pipeline's one
    measurement with the maximum of two noisy ones, a bias against the pipeline about the size of the noise
    (+-5 % between runs on a shared 2-core VM)."""
    return max(keys, key=lambda k: statistics.median(r["images_per_s"] for r in m[k]))


def paired(rounds, baseline, key="images_per_s") -> dict:
    """``rounds[k][key] / baseline[k]["images_per_s"]`` for each round k, the two measured back to back (slow
    drifts of a shared machine cancel out): their median, min, max and the list."""
    r = [x[key] / b["images_per_s"] for x, b in zip(rounds, baseline)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "per_round": r}


def host_cpu() -> tuple[int, int]:
    """(steal, total) jiffies of the whole machine from /proc/stat ((0, 0) where there is none)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (v[7] if len(v) > 7 else 0), sum(v[:8])


def steal_share(start: tuple[int, int], end: tuple[int, int]) -> float | None:
    """The share of this VM's CPU time the hypervisor gave to others between two :func:`host_cpu` readings."""
    total = end[1] - start[1]
    return (end[0] - start[0]) / total if total > 0 else None


def machine_lines(result: dict) -> list[str]:
    """A report's lines on where it ran: CPU, load, onnxruntime, the host's steal (where recorded), lscpu, lock."""
    env, steal = result["environment"], result.get("host_steal")
    return [f"Machine: {env['cpu_model']}, {env['cpu_cores']} cores, SIMD {', '.join(env['cpu_features'])}; "
            f"load average at the end {env['load_avg_1_5_15']}; onnxruntime {env['versions']['onnxruntime']}"
            + (f"; the host took {steal * 100:.1f} % of this VM's CPU time during the run (steal)" if steal is not None
               else "") + ".",
            f"lscpu: {result['lscpu']}", f"CPU lock: {result['cpu_lock']}."]


def paired_text(p: dict | None) -> str:
    """A :func:`paired` result as ``median (min - max)``."""
    return f"{p['median']:.3f} ({p['min']:.2f} - {p['max']:.2f})" if p else "-"

