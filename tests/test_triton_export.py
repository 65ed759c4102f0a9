"""Triton model repositories: every config parses with Triton's own ModelConfig schema and matches the ONNX;
broken configs are refused in one line; a failed export leaves the repository as it was (no server needed)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")

from darkconv.errors import BackendUnavailable, DarkconvError, ExportError  # noqa: E402
from darkconv.export import triton as tx  # noqa: E402


@pytest.fixture(scope="module")
def repos(default_onnx, tmp_path_factory):
    """The real yolov3-tiny exported for the onnxruntime and python platforms."""
    out = {}
    for platform in ("onnxruntime", "python"):
        repo = tmp_path_factory.mktemp(f"repo-{platform}")
        out[platform] = (repo, tx.export_triton(default_onnx, repo, platform=platform, max_batch=8, instances=2,
                                                image_input="bytes" if platform == "onnxruntime" else "uint8"))
    return out


def test_repository_layout_and_configs(repos):
    pb, text_format = tx._pb()
    repo, info = repos["onnxruntime"]
    name = info.name
    assert info.models == [name, f"{name}_pre", f"{name}_post", f"{name}_detect", f"{name}_detect_tensors"]
    assert (repo / name / "1" / "model.onnx").is_file()
    for m in info.models:  # read back with Triton's own schema, independently of the exporter
        cfg = pb.ModelConfig()
        text_format.Parse((repo / m / "config.pbtxt").read_text(), cfg)
        assert cfg.name == m
    net = tx.parse_config(repo / name / "config.pbtxt")
    assert net.platform == "onnxruntime_onnx" and net.max_batch_size == 8
    assert [(t.name, list(t.dims), t.data_type) for t in net.input] == [("images", [3, 416, 416], pb.TYPE_FP32)]
    assert [(t.name, list(t.dims)) for t in net.output] == [("head_16", [255, 13, 13]), ("head_23", [255, 26, 26])]
    assert list(net.dynamic_batching.preferred_batch_size) == [4, 8]
    assert net.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [(g.count, g.kind) for g in net.instance_group] == [(2, pb.ModelInstanceGroup.KIND_AUTO)]
    assert tx.spec_of(net).heads[0].anchors == ((81.0, 82.0), (135.0, 169.0), (344.0, 319.0))
    pre = tx.parse_config(repo / f"{name}_pre" / "config.pbtxt")
    assert pre.backend == "python" and pre.input[0].data_type == pb.TYPE_STRING
    ens = tx.parse_config(repo / f"{name}_detect" / "config.pbtxt")
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [f"{name}_pre", name, f"{name}_post"]
    assert [o.name for o in ens.output] == list(tx.DETECTION_OUTPUTS)
    shim = (repo / f"{name}_post" / "1" / "model.py").read_text()
    assert "from darkconv.triton_models import PostprocessModel as TritonPythonModel" in shim


def test_python_platform_and_uint8_images(repos):
    pb, _ = tx._pb()
    repo, info = repos["python"]
    net = tx.parse_config(repo / info.name / "config.pbtxt")
    assert net.backend == "python" and not net.platform
    assert (repo / info.name / "1" / "model.onnx").is_file() and (repo / info.name / "1" / "model.py").is_file()
    assert net.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    ens = tx.parse_config(repo / f"{info.name}_detect" / "config.pbtxt")
    assert (ens.input[0].data_type, list(ens.input[0].dims)) == (pb.TYPE_UINT8, [-1])


def test_tensorrt_config_parses(default_onnx):
    from darkconv.onnx_meta import read_spec

    spec = read_spec(default_onnx)
    text = tx.config_text(tx.model_config("y", spec, "tensorrt", max_batch=4))
    pb, text_format = tx._pb()
    cfg = text_format.Parse(text, pb.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]


def test_tensorrt_platform_without_tensorrt_writes_nothing(default_onnx, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the engine would be built")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable):
        tx.export_triton(default_onnx, tmp_path / "r", platform="tensorrt")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def _copy(repo, tmp_path):
    import shutil

    dest = tmp_path / "repo"
    shutil.copytree(repo, dest)
    return dest


def test_wrong_configs_are_refused(repos, tmp_path):
    repo, info = repos["onnxruntime"]
    bad = _copy(repo, tmp_path)
    net = bad / info.name / "config.pbtxt"
    text = net.read_text()
    net.write_text(text.replace("max_batch_size: 8", "max_batch_sizes: 8"))  # not a ModelConfig field
    with pytest.raises(ExportError, match=r"config.pbtxt:\d+: not a valid Triton model config.*max_batch_sizes"):
        tx.validate_repository(bad)
    net.write_text(text.replace("dims: 416\n  dims: 416", "dims: 320\n  dims: 320", 1))  # not the ONNX's input
    with pytest.raises(ExportError, match="differ from the ONNX"):
        tx.validate_repository(bad)
    net.write_text(text.replace('name: "head_23"', 'name: "head_22"'))
    with pytest.raises(ExportError, match="head_22"):
        tx.validate_repository(bad)
    net.write_text(text)
    ens = bad / f"{info.name}_detect" / "config.pbtxt"
    etext = ens.read_text()
    head, _, tail = etext.rpartition('value: "_head_16"')  # the last use: _post's input
    ens.write_text(head + 'value: "_head_61"' + tail)  # post reads a tensor nobody made
    with pytest.raises(ExportError, match="step 3: tensor '_head_61' is neither"):
        tx.validate_repository(bad)
    ens.write_text(etext.replace(f'model_name: "{info.name}_post"', 'model_name: "missing_post"'))
    with pytest.raises(ExportError, match="no model 'missing_post'"):
        tx.validate_repository(bad)
    ens.write_text(etext)
    (bad / info.name / "1" / "model.onnx").unlink()
    with pytest.raises(ExportError, match="no version folder with model.onnx"):
        tx.validate_repository(bad)


def test_failed_export_leaves_repository_unchanged(default_torch_model, repos, tmp_path):
    from darkconv.export.onnx import export_onnx

    fixed = export_onnx(default_torch_model, tmp_path / "fixed.onnx", batch=1)
    repo = _copy(repos["python"][0], tmp_path)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    with pytest.raises(ExportError, match="fixed batch"):
        tx.export_triton(fixed, repo, name=repos["python"][1].name, platform="python")
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    with pytest.raises(ExportError, match="model name"):
        tx.export_triton(fixed, repo, name="bad name!", platform="python")


def test_pack_unpack_detections_roundtrip(default_model, sample_images):
    from darkconv.pipeline import detect_arrays, open_runner
    from darkconv.triton_models import pack_detections, unpack_detections

    _, images = sample_images
    with open_runner(default_model.cfg, default_model.weights, "torch") as r:
        dets = detect_arrays(r, images[:3], thresh=0.25)
    packed = pack_detections(dets)
    assert packed["BOXES"].shape == (3, max(len(d) for d in dets), 4)
    back = unpack_detections(packed)
    empty = pack_detections([type(dets[0]).empty()])
    assert empty["BOXES"].shape == (1, 1, 4) and empty["NUM_DETECTIONS"].tolist() == [[0]]
    assert len(unpack_detections(empty)[0]) == 0
    for a, b in zip(dets, back):
        for f in ("boxes", "scores", "class_ids", "box_ids", "objectness"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_parse_urls():
    from darkconv.runners.triton import parse_urls

    assert parse_urls("a:8000, grpc://b:9001,c:8001,http://d:8001") == [
        ("http", "a:8000"), ("grpc", "b:9001"), ("grpc", "c:8001"), ("http", "d:8001")]
    for bad in ("", "nohost", "a:99999", "ftp://a:1"):
        with pytest.raises(DarkconvError):
            parse_urls(bad)


def test_bench_concurrent_loop_keeps_n_in_flight():
    import threading

    from darkconv.bench import concurrent_loop

    barrier = threading.Barrier(3, timeout=30)  # passes only if 3 calls are in flight at once
    seen = threading.local()

    def step():
        if not getattr(seen, "first", False):
            seen.first = True
            barrier.wait()

    samples, wall = concurrent_loop(step, 3, iters=10)
    assert len(samples) == 10 and wall > 0
    with pytest.raises(ZeroDivisionError):
        concurrent_loop(lambda: 1 / 0, 2, iters=4)


def test_detect_marks_only_the_failed_batch(default_onnx, sample_images):
    """A runner that finally fails one batch (InferenceError, as the triton runner does after its retries):
    detect reports exactly that batch's images as failed and keeps every other result, in input order."""
    from darkconv.detect import run_detect
    from darkconv.errors import InferenceError
    from darkconv.pipeline import open_runner, resolve_names

    files, _ = sample_images
    with open_runner(default_onnx) as ort:
        names = resolve_names(ort.spec)
        want, _ = run_detect(ort, files, names, batch=2, echo=lambda *_: None)

        class FailsSecondBatch:
            spec, calls = ort.spec, 0

            def infer(self, x):
                self.calls += 1
                if self.calls == 2:
                    raise InferenceError("server gone after 3 attempts")
                return ort.infer(x)

        got, _ = run_detect(FailsSecondBatch(), files, names, batch=2, echo=lambda *_: None)
    assert [r.path for r in got] == [r.path for r in want]
    assert [r.error for r in got] == [None, None, "server gone after 3 attempts", "server gone after 3 attempts",
                                      None]
    assert [r.failed_stage for r in got] == [None, None, "inference", "inference", None]
    for g, w in zip(got, want):
        if g.error is None:
            np.testing.assert_array_equal(g.detections.scores, w.detections.scores)


def test_served_name(repos, tmp_path):
    from darkconv.runners.triton import served_name

    repo, info = repos["onnxruntime"]
    assert served_name(repo) == info.name  # the one network of the repository (not _pre/_post/ensembles)
    assert served_name(repo / f"{info.name}_detect") == f"{info.name}_detect"
    assert served_name("models/yolov4.cfg") == "yolov4" and served_name("yolo") == "yolo"
    with pytest.raises(DarkconvError, match="0 darkconv networks"):
        served_name(tmp_path)
