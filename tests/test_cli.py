"""The ``darkconv`` command line: help texts, one-line errors with non-zero exits, nothing half-written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import darkconv
from darkconv.cli import main

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"

#: options each command's --help must mention
KEY_OPTIONS = {
    None: ["convert", "detect", "parity", "demo", "--version"],
    "convert": ["--precision", "--calib", "--calib-method", "--int8-target", "--size", "--batch", "--opset",
                "--names", "--engine", "--workspace", "--timing-cache", "-o, --output"],
    "detect": ["--backend", "--thresh", "--nms", "--letterbox", "--names", "--out", "--json", "--batch"],
    "parity": ["--backends", "--precision", "--images", "--tol-head", "--tol-score"],
    "demo": ["--out"],
    "bench": ["--backend", "--batch"],
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(r, *needles, code=None):
    assert r.exit_code != 0 if code is None else r.exit_code == code, r.output
    err = r.stderr.strip()
    assert err.startswith("darkconv: error: ") and "\n" not in err, err
    assert "Traceback" not in r.output
    for n in needles:
        assert n in err, err
    return err


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# ------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", sorted(main.commands, key=str) + [None], ids=str)
def test_help(command):
    r = invoke(*([command] if command else []), "--help")
    assert r.exit_code == 0, r.output
    assert "Usage: " in r.output
    for opt in KEY_OPTIONS.get(command, []):
        assert opt in r.output, (command, opt)
    if command:  # -h works too
        assert invoke(command, "-h").output == r.output


@pytest.mark.slow
def test_entry_point_subprocess():
    """The installed console script (or python -m darkconv.cli): --version, and a real non-zero exit."""
    exe = [sys.executable, "-m", "darkconv.cli"]
    r = subprocess.run(exe + ["--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and darkconv.__version__ in r.stdout
    r = subprocess.run(exe + ["convert", "missing.cfg", "missing.weights"], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).parent)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "darkconv: error: missing.cfg: cannot read cfg: No such file or directory\n"


# --------------------------------------------------------------------------- convert errors
@pytest.fixture(scope="module")
def bad_inputs(default_model, tmp_path_factory):
    """Broken variants of the real yolov3-tiny cfg/weights."""
    d = tmp_path_factory.mktemp("bad")
    cfg = Path(default_model.cfg).read_text()
    w = Path(default_model.weights).read_bytes()
    first = cfg.index("classes=80")  # the first [yolo] (layer 16)
    (d / "classes1.cfg").write_text(cfg[:first] + "classes=1" + cfg[first + len("classes=80"):])
    (d / "truncated.weights").write_bytes(w[:-400])
    (d / "trailing.weights").write_bytes(w + b"\0" * 8)
    (d / "page.weights").write_bytes(b"<!DOCTYPE html>\n<html><head><title>404</title></head></html>\n")
    (d / "lfs.weights").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    other = darkconv.load(CFG_DIR / "yolov4-tiny.cfg")  # a different (smaller) network's weights
    other.save_weights(d / "yolov4-tiny.weights")
    return d


CONVERT_ERRORS = [
    # (cfg, weights, expected pieces of the one-line message)
    ("classes1.cfg", None, ["classes1.cfg:", "layer 16 [yolo]", "layer 15", "filters=18", "classes=1",
                            "the cfg gives 255"]),
    (None, "yolov4-tiny.weights", ["yolov4-tiny.weights:", "layer", "[convolutional]", "needs", "more floats",
                                   "only", "left in the file"]),
    (None, "truncated.weights", ["truncated.weights: layer 22 [convolutional]: needs 65280 more floats",
                                 "only 65180 left"]),
    (None, "trailing.weights", ["trailing.weights:", "2 floats (8 bytes) left over after the last layer"]),
    (None, "page.weights", ["page.weights:", "HTML page, not a .weights file"]),
    (None, "lfs.weights", ["lfs.weights:", "Git LFS pointer"]),
    (None, "missing.weights", ["missing.weights:", "No such file"]),
    ("missing.cfg", None, ["missing.cfg:", "No such file"]),
]


@pytest.mark.parametrize("cfg, weights, needles", CONVERT_ERRORS, ids=[c or w for c, w, _ in CONVERT_ERRORS])
def test_convert_errors_are_one_line(tmp_path, default_model, bad_inputs, cfg, weights, needles):
    cfg = bad_inputs / cfg if cfg else default_model.cfg
    weights = bad_inputs / weights if weights else default_model.weights
    before = listing(bad_inputs)
    out = tmp_path / "out.onnx"
    r = invoke("convert", cfg, weights, "-o", out)
    assert_one_line_error(r, *needles, code=1)
    assert listing(tmp_path) == [] and listing(bad_inputs) == before


def test_convert_engine_without_tensorrt(tmp_path, default_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.chdir(tmp_path)
    r = invoke("convert", default_model.cfg, default_model.weights, "--engine", tmp_path / "m.plan")
    assert_one_line_error(r, "TensorRT is not installed", "pip install 'darkconv[trt]'", code=3)
    assert listing(tmp_path) == []  # checked before anything is exported


def test_convert_int8_without_calib_is_a_usage_error(tmp_path, default_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("convert", default_model.cfg, default_model.weights, "--precision", "int8")
    assert r.exit_code == 2
    # usage errors are one line like every other darkconv error
    assert "--precision int8 needs --calib" in r.output
    assert r.output.startswith("darkconv: error:") and r.output.count("\n") == 1
    assert listing(tmp_path) == []


@pytest.mark.parametrize("args, needle", [
    (["--size", "400x416"], "multiples of 32"),
    (["--size", "big"], "expected WxH"),
    (["--batch", "4:2:8"], "0 < MIN <= OPT <= MAX"),
    (["--opset", "13"], "13 is not in the range 18<=x<=21"),
    (["--precision", "int4"], "'int4' is not one of"),
])
def test_convert_bad_options(tmp_path, default_model, args, needle):
    r = invoke("convert", default_model.cfg, default_model.weights, "-o", tmp_path / "m.onnx", *args)
    assert r.exit_code == 2 and needle in r.output
    assert listing(tmp_path) == []


def test_convert_export_failure_leaves_nothing(tmp_path, default_model, monkeypatch):
    def boom(*a, **k):
        raise onnx.checker.ValidationError("injected")

    monkeypatch.setattr(onnx.checker, "check_model", boom)
    r = invoke("convert", default_model.cfg, default_model.weights, "-o", tmp_path / "m.onnx")
    assert_one_line_error(r, "the exported ONNX fails onnx.checker: injected", code=1)
    assert listing(tmp_path) == []


# -------------------------------------------------------------------------- convert success
@pytest.mark.slow
def test_convert_fp32_and_fp16(tmp_path, default_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sizes = {}
    for precision, name in [("fp32", "yolov3-tiny.onnx"), ("fp16", "yolov3-tiny-fp16.onnx")]:
        r = invoke("convert", default_model.cfg, default_model.weights, "--precision", precision,
                   "--size", "320x256", "--batch", "2")
        assert r.exit_code == 0, r.output
        size = (tmp_path / name).stat().st_size
        sizes[precision] = size
        assert f"input 320x256, heads [(8, 10), (16, 20)]" in r.output
        assert f"wrote {name} ({precision}, {size / 1e6:.1f} MB) in " in r.output
        assert "8,858,734 weights" in r.output
    assert listing(tmp_path) == ["yolov3-tiny-fp16.onnx", "yolov3-tiny.onnx"]
    assert 35e6 < sizes["fp32"] < 36e6 and 0.49 < sizes["fp16"] / sizes["fp32"] < 0.51
    proto = onnx.load(str(tmp_path / "yolov3-tiny-fp16.onnx"))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 256, 320]
    # the ONNX runs and names its heads by Darknet layer
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "yolov3-tiny.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": np.zeros((2, 3, 256, 320), np.float32)})
    assert [o.name for o in sess.get_outputs()] == ["head_16", "head_23"]
    assert [o.shape for o in out] == [(2, 255, 8, 10), (2, 255, 16, 20)]


# ---------------------------------------------------------------------------- review findings
def test_convert_names_with_wrong_count_is_refused(tmp_path, default_model):
    names = tmp_path / "two.names"
    names.write_text("a\nb\n")
    out = tmp_path / "n.onnx"
    r = invoke("convert", default_model.cfg, default_model.weights, "--names", names, "-o", out)
    assert_one_line_error(r, "2 names for a model with classes=80", code=1)
    assert not out.exists()


def test_convert_into_missing_folder_is_one_line(tmp_path, default_model):
    r = invoke("convert", default_model.cfg, default_model.weights, "-o", tmp_path / "nodir" / "x.onnx")
    assert_one_line_error(r, "does not exist", code=1)


def test_detect_on_corrupt_onnx_is_one_line(tmp_path):
    bad = tmp_path / "g.onnx"
    bad.write_bytes(b"garbage")
    r = invoke("detect", bad, Path(darkconv.__file__).parent / "data" / "dog.jpg")
    assert_one_line_error(r, "not a valid ONNX file", code=1)


def test_detect_option_ranges_are_one_line_usage_errors(default_onnx):
    img = Path(darkconv.__file__).parent / "data" / "dog.jpg"
    for opts in (["--max-det", "0"], ["--thresh", "2"], ["--threads", "0"]):
        r = invoke("detect", default_onnx, img, *opts)
        assert r.exit_code == 2 and r.output.startswith("darkconv: error:") and r.output.count("\n") == 1, r.output


def test_detect_with_no_images_writes_nothing(tmp_path, default_onnx):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("detect", default_onnx, empty, "--json", tmp_path / "j.json", "--out", tmp_path / "o")
    assert_one_line_error(r, "no images found", code=2)
    assert not (tmp_path / "j.json").exists() and not (tmp_path / "o").exists()


def test_fixed_batch_onnx_with_larger_batch_is_one_line(tmp_path, default_model):
    out = tmp_path / "f1.onnx"
    assert invoke("convert", default_model.cfg, default_model.weights, "--batch", "1", "-o", out).exit_code == 0
    r = invoke("detect", out, Path(darkconv.__file__).parent / "data", "--batch", "2")
    assert_one_line_error(r, "takes at most 1 image(s) per batch, got --batch 2: use --batch 1", code=1)


def test_bench_plot_must_be_png(default_onnx, tmp_path):
    r = invoke("bench", default_onnx, "--iters", "1", "--warmup", "0", "--plot", tmp_path / "x.txt")
    assert r.exit_code == 2 and "name it *.png" in r.output
    assert not (tmp_path / "x.txt").exists()


def test_outputs_get_the_usual_file_mode(tmp_path, default_model):
    out = tmp_path / "m.onnx"
    old = os.umask(0o022)
    try:
        assert invoke("convert", default_model.cfg, default_model.weights, "-o", out).exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_detect_batched_with_a_corrupt_image_keeps_order_and_fails_at_the_end(tmp_path, default_onnx):
    import shutil

    data = Path(darkconv.__file__).parent / "data"
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(data / "dog.jpg", d / "a.jpg")
    (d / "b.jpg").write_bytes(b"not a jpeg")
    shutil.copy(data / "person.jpg", d / "c.jpg")
    r = invoke("detect", default_onnx, d, "--batch", "3", "--json", tmp_path / "r.json")
    assert r.exit_code == 2 and "1 of 3 image(s) could not be read" in r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(str(d))]
    assert [Path(ln.split(" ", 1)[0].rstrip(":")).name for ln in lines] == ["a.jpg", "b.jpg", "c.jpg"]
    import json
    frames = json.loads((tmp_path / "r.json").read_text())
    assert [Path(f["filename"]).name for f in frames] == ["a.jpg", "c.jpg"]
