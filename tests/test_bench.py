"""``darkconv bench`` and darkconv.bench: statistics, the timing loop, JSON schema, errors, Ctrl-C.

Fast: the CLI runs use yolov3-tiny's cfg at 64x64 with random weights, and one tiny run of the
real yolov3-tiny at 416 with --iters 2 --warmup 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from darkconv import bench as bm
from darkconv.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = ROOT / "cfg" / "yolov3-tiny.cfg"
DOG = ROOT / "darkconv" / "data" / "dog.jpg"
SMALL = ["--size", "64x64"]


def run_cli(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)], catch_exceptions=False)


# -- statistics and the loop -------------------------------------------------------------------
def test_latency_stats_figures():
    s = [0.010, 0.020, 0.030, 0.040]
    st = bm.latency_stats(s, batch=2)
    ms = np.array(s) * 1e3
    assert st["iters"] == 4 and st["batch"] == 2
    assert st["mean_ms"] == pytest.approx(25.0)
    for q in (50, 90, 99):
        assert st[f"p{q}_ms"] == pytest.approx(np.percentile(ms, q))
    assert st["min_ms"] == pytest.approx(10.0) and st["max_ms"] == pytest.approx(40.0)
    assert st["std_ms"] == pytest.approx(ms.std())
    assert st["per_image_ms"] == pytest.approx(12.5)
    assert st["throughput_ips"] == pytest.approx(80.0)  # 2 images / 25 ms
    assert set(bm.STAT_KEYS) <= set(st)


def test_latency_stats_empty():
    st = bm.latency_stats([], batch=4)
    assert st["iters"] == 0 and all(st[k] is None for k in bm.STAT_KEYS)


def test_parse_batches():
    assert bm.parse_batches("1,4,8") == [1, 4, 8]
    assert bm.parse_batches("4, 1,4") == [4, 1]
    for bad in ("0", "a", "", "1,-2"):
        with pytest.raises(ValueError):
            bm.parse_batches(bad)


def test_time_loop_counts_and_warmup():
    calls = []
    samples, splits, stop = bm.time_loop(lambda: calls.append(1), warmup=2, iters=5)
    assert len(calls) == 7 and len(samples) == 5 and splits == [] and not stop
    # --seconds: stops once the time is spent, but never before MIN_ITERS timed calls
    samples, _, _ = bm.time_loop(lambda: None, warmup=0, seconds=1e-9)
    assert len(samples) == bm.MIN_ITERS
    _, splits, _ = bm.time_loop(lambda: {"decode": 0.001}, warmup=0, iters=2)
    assert splits == [{"decode": 0.001}] * 2


def test_time_loop_keeps_samples_on_ctrl_c():
    n = {"calls": 0}

    def step():
        n["calls"] += 1
        if n["calls"] == 5:
            raise KeyboardInterrupt

    samples, _, stop = bm.time_loop(step, warmup=1, iters=100)
    assert stop and len(samples) == 3


def test_split_stats_per_image_and_ratio():
    splits = [{"decode": 0.004, "preprocess": 0.002, "inference": 0.010, "postprocess": 0.004}] * 3
    e = bm.split_stats(splits, batch=2, raw_per_image_ms=5.0)
    assert e["decode_ms"] == pytest.approx(2.0) and e["inference_ms"] == pytest.approx(5.0)
    assert e["total_ms"] == pytest.approx(10.0)
    assert e["e2e_over_inference"] == pytest.approx(2.0)
    assert e["images"] == 6 and e["raw_inference_ms"] == 5.0
    # a raw call timed in the same iteration wins over the separate figure
    e = bm.split_stats([{**splits[0], "raw": 0.016}] * 3, batch=2, raw_per_image_ms=5.0)
    assert e["raw_inference_ms"] == pytest.approx(8.0) and e["e2e_over_inference"] == pytest.approx(1.25)


# -- CLI -----------------------------------------------------------------------------------------
RESULT_KEYS = {"schema", "created", "model", "backend", "settings", "load", "results", "notes", "interrupted",
               "environment"}
MODEL_KEYS = {"path", "kind", "sha256", "weights", "weights_sha256", "random_weights", "input", "classes"}
ENV_KEYS = {"cpu_model", "cpu_cores", "threads", "gpu", "load_avg_1_5_15", "platform", "python", "versions"}
VERSION_KEYS = {"darkconv", "torch", "onnxruntime", "tensorrt", "numpy", "onnx", "opencv"}
E2E_KEYS = {f"{s}_ms" for s in bm.STAGES} | {"total_ms", "throughput_ips", "raw_inference_ms", "e2e_over_inference",
                                              "iters"}


def test_json_schema_random_weights_and_plot(tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    r = run_cli(TINY_CFG, *SMALL, "--backend", "onnxruntime", "--batch", "1,2", "--iters", "2", "--warmup", "1",
                "--threads", "2", "--e2e", DOG, "--json", out_json, "--plot", out_png)
    assert r.exit_code == 0, r.output
    assert "random weights (speed only)" in r.output
    assert "session creation" in r.output and "e2e/raw" in r.output
    d = json.loads(out_json.read_text())
    assert d["schema"] == bm.SCHEMA and RESULT_KEYS <= set(d)
    assert MODEL_KEYS <= set(d["model"]) and d["model"]["random_weights"] is True
    assert d["model"]["weights"] is None and len(d["model"]["sha256"]) == 64 and d["model"]["input"] == [64, 64]
    assert d["backend"]["name"] == "onnxruntime" and d["backend"]["precision"] == "fp32"
    assert d["backend"]["threads"] == 2
    assert {"model_load_s", "export_s", "session_create_s"} <= set(d["load"])
    assert ENV_KEYS <= set(d["environment"]) and VERSION_KEYS <= set(d["environment"]["versions"])
    assert d["environment"]["threads"] == 2
    assert "random weights (speed only)" in d["notes"] and d["interrupted"] is False
    assert [row["batch"] for row in d["results"]] == [1, 2]
    for row in d["results"]:
        assert row["error"] is None
        assert set(bm.STAT_KEYS) <= set(row["latency"]) and row["latency"]["iters"] == 2
        assert E2E_KEYS <= set(row["e2e"]) and row["e2e"]["iters"] == 2
        assert all(row["e2e"][f"{s}_ms"] > 0 for s in bm.STAGES)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_onnx_model_runs_its_own_precision(tmp_path):
    import darkconv
    from darkconv.export.onnx import export_onnx

    onnx_path = export_onnx(darkconv.load(TINY_CFG, width=64, height=64).randomize(0), tmp_path / "t.onnx")
    r = run_cli(onnx_path, "--precision", "int8", "--iters", "2", "--warmup", "0", "--json", tmp_path / "o.json")
    assert r.exit_code == 0, r.output
    assert "--precision int8 ignored" in r.output and "random weights" not in r.output
    d = json.loads((tmp_path / "o.json").read_text())
    assert d["model"]["kind"] == "onnx" and d["backend"]["precision"] == "fp32"
    assert d["backend"]["name"] == "onnxruntime"  # default backend of an .onnx


def test_trt_alias_fails_like_convert(tmp_path):
    if bm.tensorrt_version():
        pytest.skip("TensorRT is installed here: the missing-TensorRT error cannot be shown")
    r = run_cli(TINY_CFG, "--backend", "trt", "--iters", "1")
    assert r.exit_code == 3
    assert "TensorRT is not installed" in r.output and "Traceback" not in r.output
    conv = CliRunner().invoke(main, ["convert", str(TINY_CFG), str(tmp_path / "x.weights"),
                                     "--engine", str(tmp_path / "x.plan")])
    err = [ln for ln in r.output.splitlines() if ln.startswith("darkconv: error:")]
    assert conv.exit_code == 3 and err and err[0] in conv.output


def test_usage_errors():
    r = run_cli(TINY_CFG, "--iters", "2", "--seconds", "1")
    assert r.exit_code == 2 and "not both" in r.output
    r = run_cli(TINY_CFG, *SMALL, "--backend", "torch", "--precision", "int8", "--iters", "1")
    assert r.exit_code == 1 and "no INT8" in r.output
    r = run_cli(TINY_CFG, "--batch", "0")
    assert r.exit_code == 2
    r = run_cli(ROOT / "no-such.cfg", "--iters", "1")
    assert r.exit_code == 1 and "no such file" in r.output


def test_ctrl_c_prints_partial_results(monkeypatch, tmp_path):
    from darkconv.runners.torch import TorchRunner

    real, calls = TorchRunner.infer, {"n": 0}

    def infer(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # 1 warmup + 3 timed at batch 1, 1 warmup + 1 timed at batch 2, then Ctrl-C
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(TorchRunner, "infer", infer)
    r = run_cli(TINY_CFG, *SMALL, "--backend", "torch", "--batch", "1,2", "--iters", "3", "--warmup", "1",
                "--json", tmp_path / "p.json")
    assert r.exit_code == 130
    assert "interrupted" in r.output
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["interrupted"] is True
    assert d["results"][0]["latency"]["iters"] == 3 and d["results"][1]["latency"]["iters"] == 1


@pytest.mark.slow
def test_real_yolov3_tiny(default_model, tmp_path):
    r = run_cli(default_model.cfg, default_model.weights, "--backend", "torch", "--iters", "2", "--warmup", "1",
                "--threads", "2", "--e2e", DOG, "--json", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    assert "random weights" not in r.output and "416x416" in r.output
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["model"]["random_weights"] is False
    assert d["model"]["weights_sha256"] == "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"
    row = d["results"][0]
    assert row["latency"]["iters"] == 2 and row["latency"]["mean_ms"] > 0 and row["e2e"]["total_ms"] > 0
