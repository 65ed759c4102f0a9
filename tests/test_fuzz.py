"""Seeded fuzzing of cfg loading (issue #13): every mutant loads or fails with a DarkconvError, in a memory cap.

The mutation engine and the capped worker live in tests/fuzz_cfg.py (run it by hand for more mutants).
"""
from __future__ import annotations

import random

import pytest

import fuzz_cfg

COUNT, SEED = 1500, 13


def test_mutations_are_deterministic_and_varied():
    a = [t for _, _, t in fuzz_cfg.mutants(SEED, 200)]
    assert a == [t for _, _, t in fuzz_cfg.mutants(SEED, 200)]
    assert {b for _, b, _ in fuzz_cfg.mutants(SEED, 200)} == {b for b, _ in fuzz_cfg.BASES}
    texts = {b: (fuzz_cfg.ROOT / b).read_text() for b, _ in fuzz_cfg.BASES}
    changed = sum(t != texts[b] for _, b, t in fuzz_cfg.mutants(SEED, 200))
    assert changed >= 180, changed
    rng = random.Random(0)
    numbers = {fuzz_cfg.number(rng) for _ in range(400)}
    assert {"9" * 6000, "2147483648", "-2147483649", "1e39", ""} <= numbers
    assert any(n.startswith("1000000000000000") for n in numbers)
    assert any("\x00" in t for _, _, t in fuzz_cfg.mutants(SEED, 400))


@pytest.mark.slow
def test_cfg_mutants_load_or_fail_cleanly():
    counts, failures, proc = fuzz_cfg.run(SEED, COUNT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(counts.values()) == COUNT
    assert failures == [], failures[:5]
    # the mutants exercise both sides: plenty of models load (some run a forward pass), plenty are refused
    assert counts["error"] > COUNT // 5 and counts["loaded"] + counts["loaded+forward"] > COUNT // 5, counts
    assert counts["loaded+forward"] > 20, counts


def test_worker_reports_a_foreign_exception_as_failure(monkeypatch, tmp_path):
    """The harness itself: a non-darkconv exception, or an allocation beyond the cap, is a FAIL row."""
    import json
    import subprocess
    import sys

    code = ("import sys, fuzz_cfg, darkconv.graph.model as gm\n"
            "real = gm.plan_network\n"
            "def boom(cfg, shape):\n"
            "    if cfg.path.endswith('-1.cfg'): raise IndexError('planted')\n"
            "    if cfg.path.endswith('-2.cfg'): bytearray(8 << 30)\n"
            "    return real(cfg, shape)\n"
            "gm.plan_network = boom\n"
            "fuzz_cfg.worker(13, 4)\n")
    env = {**fuzz_cfg.os.environ, **fuzz_cfg.WORKER_LIMITS,
           "PYTHONPATH": f"{fuzz_cfg.ROOT}{fuzz_cfg.os.pathsep}{fuzz_cfg.ROOT / 'tests'}"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [row["outcome"] == "FAIL" for row in rows] == [False, True, True, False], rows
    assert rows[1]["detail"].startswith("IndexError: planted") and rows[2]["detail"].startswith("MemoryError")
