"""TensorRT export and runner.

TensorRT cannot be installed on the project's machines, so most of this file drives the real code
against tests/fake_trt: strict fakes of the ``tensorrt`` module of three real releases (10.0.1,
10.13.3.9, 11.4.0.106: names and enum values read from the real bindings, tests/data/trt_symbols.json)
and of cuda-python's runtime, whose copies and kernels complete only at a stream synchronize. The
engine computes the ONNX on ONNX Runtime, so every output is checked against ONNX Runtime itself.
scripts/trt_mutations.py (run by test_mutations_are_caught) checks that bugs in the runner and
builder make these tests fail. The tests at the end build and run real engines and skip where
TensorRT or a GPU is absent.
"""
from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from darkconv.darknet.spec import HeadSpec, ModelSpec
from darkconv.errors import BackendUnavailable, DarkconvError, ExportError, ModelMismatch
from darkconv.export.tensorrt import (build_engine, check_sidecar, gpu_info, make_sidecar, read_sidecar,
                                      sidecar_path, trt_available, write_sidecar)
from darkconv.runners.tensorrt import TensorRTRunner
from fake_trt import (TRT_VERSIONS, FakeCudart, install_cudart, install_tensorrt, make_tensorrt, symbols,
                      tiny_onnx)

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"
CC = "9.0"
TRT_VERSION = "10.13.3.9"
SHA_A, SHA_B = "a" * 64, "b" * 64


def small_spec() -> ModelSpec:
    heads = (HeadSpec("yolo", 16, 2, ((10, 14), (23, 27), (37, 58)), (3, 4, 5), (1, 2)),
             HeadSpec("yolo", 23, 2, ((10, 14), (23, 27), (37, 58)), (0, 1, 2), (2, 4)))
    return ModelSpec(64, 32, 3, False, heads, ("cat", "dog"), {})


def real_enum(version, enum, member):
    """A value straight from the real bindings' table (not from the fake)."""
    return symbols.table()["tensorrt"][version]["enums"][enum][member]


@pytest.fixture
def fake(monkeypatch):
    """fake(version=..., **cudart_kw) installs a fake tensorrt of that version + a fake cudart."""
    def use(version=TRT_VERSION, gpu_ok=True, **kw):
        cudart = FakeCudart(**kw)
        install_cudart(monkeypatch, cudart)
        trt = make_tensorrt(version, cudart, gpu_ok=gpu_ok)
        install_tensorrt(monkeypatch, trt)
        return trt, cudart
    return use


def write_onnx(path, model):
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_file(tmp_path):
    return write_onnx(tmp_path / "model.onnx", tiny_onnx(small_spec()))


def ort_heads(onnx_path, x, spec=None):
    """Reference: ONNX Runtime on the same ONNX, outputs in spec.heads order."""
    import onnxruntime as ort
    spec = spec or small_spec()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [f"head_{h.layer}" for h in spec.heads]
    dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    return [o.astype(np.float32) for o in sess.run(names, {"images": x.astype(dtype)})]


# -- import hygiene / absence ---------------------------------------------------------------
def test_modules_import_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    install_cudart(monkeypatch, None)
    for name in ("darkconv.tensorrt_support", "darkconv.export.tensorrt", "darkconv.runners.tensorrt"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        importlib.import_module(name)
    from darkconv.runners import runner_class
    assert runner_class("trt").__name__ == "TensorRTRunner"


def test_trt_available(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert trt_available() is None
    fake("11.4.0.106")
    assert trt_available() == "11.4.0.106"


def test_build_engine_without_tensorrt(monkeypatch, tmp_path, onnx_file):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "m.engine"
    with pytest.raises(BackendUnavailable, match=r"pip install 'darkconv\[trt\]'"):
        build_engine(onnx_file, engine, small_spec(), "fp32", timing_cache=str(tmp_path / "t.cache"), log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_runner_without_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'darkconv\[trt\]'") as e:
        TensorRTRunner(tmp_path / "m.engine").activate()
    assert e.value.exit_code == 3
    assert list(tmp_path.iterdir()) == []


def test_runner_without_cuda_python(monkeypatch, tmp_path, fake):
    fake()
    install_cudart(monkeypatch, None)
    with pytest.raises(BackendUnavailable, match=r"cuda-python.*pip install 'darkconv\[trt\]'"):
        TensorRTRunner(tmp_path / "m.engine").activate()


def test_no_gpu_is_backend_unavailable(fake, tmp_path, onnx_file):
    """cuda-python present but no driver (what this machine reports), or no device at all."""
    fake(count_err="cudaErrorInsufficientDriver")
    with pytest.raises(BackendUnavailable, match="cudaErrorInsufficientDriver"):
        build_engine(onnx_file, tmp_path / "m.engine", small_spec(), "fp32", log=None)
    fake(count=0)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        gpu_info()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_builder_creation_failure_is_backend_unavailable(fake, tmp_path, onnx_file):
    fake(gpu_ok=False)  # pybind raises TypeError when createInferBuilder returns nullptr
    with pytest.raises(BackendUnavailable, match="could not create a builder"):
        build_engine(onnx_file, tmp_path / "m.engine", small_spec(), "fp32", log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_real_cuda_python_without_gpu(monkeypatch):
    """With the real cuda-python (where installed) on a machine without a GPU driver: one clear error."""
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed")
    err, _count = runtime.cudaGetDeviceCount()
    if int(err) == 0:
        pytest.skip("this machine has a CUDA driver: the no-GPU error cannot occur")
    with pytest.raises(BackendUnavailable, match=f"cudaGetDeviceCount returned {err.name}"):
        gpu_info()


@pytest.mark.parametrize("version", symbols.CUDA_VERSIONS)
def test_fake_cudart_no_driver_matches_real_cuda_bindings(version):
    """What the real cuda-bindings wheels return on this GPU-less machine (recorded by the extraction
    script) is what the fake returns, so gpu_info's handling of it is tested on the real shape."""
    real = symbols.cuda(version)["no_gpu"]
    f = FakeCudart(version, count_err="cudaErrorInsufficientDriver")
    err, count = f.cudaGetDeviceCount()
    assert [err.name, count] == real["cudaGetDeviceCount"]
    assert int(err) == symbols.cuda(version)["enums"]["cudaError_t"][err.name]


def test_gpu_info_without_cuda_python_falls_back_to_torch(monkeypatch):
    install_cudart(monkeypatch, None)
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        name, cc = gpu_info()
        assert name and "." in cc
    else:
        with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
            gpu_info()


def test_gpu_info_with_fake_cudart(fake):
    fake()
    assert gpu_info() == (GPU, CC)


def test_check_cuda():
    from darkconv.export.tensorrt import _check_cuda
    E = FakeCudart().cudaError_t
    assert _check_cuda((E.cudaSuccess,)) is None
    assert _check_cuda((E.cudaSuccess, 5)) == 5
    assert _check_cuda((E.cudaSuccess, 1, 2)) == (1, 2)
    with pytest.raises(DarkconvError, match=r"cudaMalloc failed with cudaErrorMemoryAllocation \(2\)"):
        _check_cuda((E.cudaErrorMemoryAllocation, None), "cudaMalloc")


# -- the fakes themselves: they refuse what the real modules refuse ------------------------------
@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_fake_has_real_names_only(version):
    trt = make_tensorrt(version, FakeCudart())
    major = int(version.split(".")[0])
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == real_enum(
        version, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED") == (1 if major == 10 else 0)
    assert hasattr(trt.BuilderFlag, "FP16") == hasattr(trt.BuilderFlag, "INT8") == (major == 10)
    assert hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") == (major == 10)
    with pytest.raises(AttributeError):
        trt.IInt8EntropyCalibrator2  # noqa: B018 - not modelled on 10, absent on 11
    ctx_cls, cfg = trt.IExecutionContext, trt.Builder(trt.Logger()).create_builder_config()
    assert not hasattr(ctx_cls, "execute_async_v2")
    if major >= 11:
        with pytest.raises(AttributeError, match="int8_calibrator"):
            cfg.int8_calibrator = None
    with pytest.raises(AttributeError, match="no attribute 'nonexistent_api'"):
        trt.nonexistent_api  # noqa: B018


def test_fake_cudart_copies_complete_only_at_sync():
    cu = FakeCudart()
    s = cu.cudaStreamCreate()[1]
    n = 16
    dev, host = cu.cudaMalloc(n)[1], cu.cudaMallocHost(n)[1]
    out = cu.cudaMallocHost(n)[1]
    import ctypes
    ctypes.memmove(host, bytes(range(n)), n)
    H2D, D2H = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
    assert cu.cudaMemcpyAsync(dev, host, n, H2D, s)[0] == 0
    assert cu.cudaMemcpyAsync(out, dev, n, D2H, s)[0] == 0
    assert ctypes.string_at(out, n) == b"\xff" * n  # not there yet: garbage
    cu.cudaStreamSynchronize(s)
    assert ctypes.string_at(out, n) == bytes(range(n))
    # a host write while a copy from it is pending is a race
    cu.cudaMemcpyAsync(dev, host, n, H2D, s)
    ctypes.memset(host, 7, n)
    with pytest.raises(AssertionError, match="race"):
        cu.cudaStreamSynchronize(s)
    # wrong direction / unpinned host memory / out of bounds are errors, as in CUDA
    assert cu.cudaMemcpyAsync(host, dev, n, H2D, s)[0].name == "cudaErrorInvalidValue"
    assert cu.cudaMemcpyAsync(dev, host, n + 1, H2D, s)[0].name == "cudaErrorInvalidValue"
    assert cu.cudaMemcpyAsync(dev, id(object()), n, H2D, s)[0].name == "cudaErrorInvalidValue"


QDQ_CASES = {
    "symmetric int8 (darkconv's TensorRT recipe)": ({}, None),
    "uint8 activations, zero point 128 (ORT U8S8)": ({"act_zp": 128, "zp_type": onnx.TensorProto.UINT8},
                                                    "zero point must be 0"),
    "int8 with non-zero zero point": ({"act_zp": 3}, "zero point must be 0"),
    "INT32 bias DequantizeLinear": ({"bias_int32": True}, "input type INT32"),
    "per-channel activation scale": ({"act_channels": True}, "activations are quantized per-tensor"),
}


@pytest.mark.parametrize("case", list(QDQ_CASES))
def test_fake_parser_qdq_rules(case, fake, tmp_path):
    qdq, err = QDQ_CASES[case]
    trt, _ = fake()
    path = write_onnx(tmp_path / "q.onnx", tiny_onnx(small_spec(), qdq=qdq))
    net = trt.Builder(trt.Logger()).create_network(0)
    parser = trt.OnnxParser(net, trt.Logger())
    ok = parser.parse_from_file(str(path))
    msgs = [parser.get_error(i).desc() for i in range(parser.num_errors)]
    assert ok == (err is None), msgs
    if err:
        assert any(err in m for m in msgs), msgs


# -- source guard -----------------------------------------------------------------------------
REMOVED_APIS = ("EXPLICIT_BATCH", "int8_calibrator", "IInt8EntropyCalibrator", "BuilderFlag.FP16",
                "BuilderFlag.INT8", "execute_async_v2", "get_binding_shape", "num_bindings", "pycuda")


@pytest.mark.parametrize("module", ["darkconv/export/tensorrt.py", "darkconv/runners/tensorrt.py",
                                    "darkconv/tensorrt_support.py"])
def test_no_removed_tensorrt_apis(module):
    text = (ROOT / module).read_text()
    used = [api for api in REMOVED_APIS if api in text]
    assert not used, f"{module} mentions APIs removed from TensorRT 10/11: {used}"


# -- sidecar ------------------------------------------------------------------------------------
def sample_sidecar(**kw):
    args = dict(precision="fp16", batch=(1, 2, 8), trt_version=TRT_VERSION, gpu=GPU, cc=CC,
                cfg_sha256=SHA_A, weights_sha256=SHA_B, onnx_sha256="c" * 64)
    args.update(kw)
    return make_sidecar(small_spec(), **args)


def test_sidecar_round_trip(tmp_path):
    sc = sample_sidecar()
    assert sc["input"] == {"name": "images", "shape": [3, 32, 64], "batch": [1, 2, 8]}
    assert sc["tensorrt"] == TRT_VERSION and sc["gpu"] == GPU and sc["compute_capability"] == CC
    assert sc["precision"] == "fp16" and sc["darkconv"]
    assert (sc["cfg_sha256"], sc["weights_sha256"], sc["onnx_sha256"]) == (SHA_A, SHA_B, "c" * 64)
    engine = tmp_path / "m.engine"
    assert sidecar_path(engine) == tmp_path / "m.engine.json"
    write_sidecar(sidecar_path(engine), sc)
    back = read_sidecar(engine)
    assert back == json.loads(json.dumps(sc))
    assert ModelSpec.from_dict(back["spec"]) == small_spec()
    assert [p.name for p in tmp_path.iterdir()] == ["m.engine.json"]  # no temp file left
    check_sidecar(back, trt_version=TRT_VERSION, gpu=GPU, cc=CC, cfg_sha256=SHA_A, weights_sha256=SHA_B,
                  spec=small_spec())


def test_sidecar_missing_and_corrupt(tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(ModelMismatch, match=r"no sidecar m\.engine\.json.*darkconv convert --engine"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ModelMismatch, match="not valid JSON"):
        read_sidecar(engine)


@pytest.mark.parametrize("kw,field,engine_val,current", [
    ({"trt_version": "10.13.4.1"}, "tensorrt", TRT_VERSION, "10.13.4.1"),
    ({"trt_version": "11.4.0.106"}, "tensorrt", TRT_VERSION, "11.4.0.106"),
    ({"gpu": "NVIDIA A100-SXM4-80GB"}, "gpu", GPU, "NVIDIA A100-SXM4-80GB"),
    ({"cc": "8.0"}, "compute_capability", CC, "8.0"),
    ({"cfg_sha256": "d" * 64}, "cfg_sha256", "aaaaaaaaaaaa", "dddddddddddd"),
    ({"weights_sha256": "e" * 64}, "weights_sha256", "bbbbbbbbbbbb", "eeeeeeeeeeee"),
])
def test_check_sidecar_refuses(kw, field, engine_val, current):
    args = dict(trt_version=TRT_VERSION, gpu=GPU, cc=CC, cfg_sha256=SHA_A, weights_sha256=SHA_B)
    args.update(kw)
    with pytest.raises(ModelMismatch) as e:
        check_sidecar(sample_sidecar(), engine_path="m.engine", **args)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("m.engine: ")
    assert f"{field} is {engine_val}" in msg and current in msg
    assert "rebuild with darkconv convert --engine" in msg


def test_check_sidecar_accepts_same_patch_other_build_and_unknown_hashes():
    sc = sample_sidecar()
    check_sidecar(sc, trt_version="10.13.3.99", gpu=GPU, cc=CC)  # build number is not part of compatibility
    with pytest.raises(ModelMismatch, match="cfg_sha256 is none recorded"):
        check_sidecar(sample_sidecar(cfg_sha256=None), trt_version=TRT_VERSION, gpu=GPU, cc=CC, cfg_sha256=SHA_A)


def test_check_sidecar_refuses_other_model_spec():
    spec = small_spec()
    other = ModelSpec(96, 32, 3, False, spec.heads, (), {})
    with pytest.raises(ModelMismatch, match=r"input shape is 3x32x64 .* 3x32x96"):
        check_sidecar(sample_sidecar(), trt_version=TRT_VERSION, gpu=GPU, cc=CC, spec=other)
    with pytest.raises(ModelMismatch, match="heads"):
        check_sidecar(sample_sidecar(), trt_version=TRT_VERSION, gpu=GPU, cc=CC,
                      spec=ModelSpec(64, 32, 3, False, spec.heads[:1], (), {}))



# -- builder against the fake tensorrt -------------------------------------------------------------
@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_build_strongly_typed_profile_workspace_cache(fake, tmp_path, onnx_file, version):
    trt, _ = fake(version)
    engine, cache = tmp_path / "out" / "m.engine", tmp_path / "t.cache"
    cfg, weights = tmp_path / "m.cfg", tmp_path / "m.weights"
    cfg.write_text("[net]\n")
    weights.write_bytes(b"\0" * 20)
    msgs = []
    sc = build_engine(onnx_file, engine, small_spec(), "FP16", batch=(1, 2, 8), workspace_gb=1.5,
                      timing_cache=str(cache), source={"cfg": str(cfg), "weights_sha256": SHA_B}, log=msgs.append)
    log = trt._fake.log
    # the STRONGLY_TYPED bit with the real bindings' value (1 on 10.x, 0 on 11.x)
    assert ("create_network", 1 << real_enum(version, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED")) in log
    assert trt._fake.networks[-1]._strongly_typed
    assert ("parse_from_file", str(onnx_file)) in log
    assert ("set_shape", "images", (1, 3, 32, 64), (2, 3, 32, 64), (8, 3, 32, 64)) in log
    assert ("set_memory_pool_limit", "WORKSPACE", int(1.5 * (1 << 30))) in log
    assert ("create_timing_cache", b"") in log and ("set_timing_cache", b"", False) in log
    names = [c[0] for c in log]
    assert names.index("set_timing_cache") < names.index("build_serialized_network") < names.index("get_timing_cache")
    assert cache.read_bytes() == f"TC{version}".encode()
    assert trt._fake.errors == []
    side = json.loads(sidecar_path(engine).read_text())
    assert side == sc
    assert sc["precision"] == "fp16" and sc["tensorrt"] == version
    assert sc["gpu"] == GPU and sc["compute_capability"] == CC
    assert sc["input"] == {"name": "images", "shape": [3, 32, 64], "batch": [1, 2, 8]}
    from darkconv.io import sha256_file as sha256
    assert sc["cfg_sha256"] == sha256(cfg) and sc["weights_sha256"] == SHA_B
    assert sc["onnx_sha256"] == sha256(onnx_file) and sc["engine_sha256"] == sha256(engine)
    assert sorted(p.name for p in engine.parent.iterdir()) == ["m.engine", "m.engine.json"]  # atomic: no temps
    assert any("building TensorRT" in m for m in msgs)
    # the engine really carries the profile: a runtime of the same version accepts batch 1..8 only
    eng = trt.Runtime(trt.Logger()).deserialize_cuda_engine(engine.read_bytes())
    assert eng.get_tensor_profile_shape("images", 0) == [(1, 3, 32, 64), (2, 3, 32, 64), (8, 3, 32, 64)]
    assert eng._desc["strongly_typed"]


def test_build_timing_cache_reused_and_mismatched(fake, tmp_path, onnx_file):
    trt, _ = fake()
    cache = tmp_path / "new.cache"
    build_engine(onnx_file, tmp_path / "a.engine", small_spec(), "fp32", timing_cache=str(cache), log=None)
    first = cache.read_bytes()
    msgs = []
    build_engine(onnx_file, tmp_path / "b.engine", small_spec(), "fp32", timing_cache=str(cache), log=msgs.append)
    assert ("set_timing_cache", first, False) in trt._fake.log and any("loaded" in m for m in msgs)
    trt, _ = fake("11.4.0.106")  # a cache from 10.13 is refused by 11.4: start a fresh one
    msgs = []
    build_engine(onnx_file, tmp_path / "c.engine", small_spec(), "fp32", timing_cache=str(cache), log=msgs.append)
    assert ("set_timing_cache", first, False) in trt._fake.log and ("set_timing_cache", b"", False) in trt._fake.log
    assert any("fresh" in m for m in msgs)
    assert cache.read_bytes() == b"TC11.4.0.106"


def test_build_parser_errors_all_surfaced(fake, tmp_path):
    """A Q/DQ model TensorRT's parser refuses (per-channel activation scales) and darkconv's own
    pre-check lets through: every parser error reaches the one-line message, nothing is written."""
    fake()
    onnx_path = write_onnx(tmp_path / "model.onnx", tiny_onnx(small_spec(), qdq={"act_channels": True}))
    engine = tmp_path / "m.engine"
    with pytest.raises(ExportError) as e:
        build_engine(onnx_path, engine, small_spec(), "int8", log=None)
    msg = str(e.value)
    assert "2 error(s)" in msg and str(onnx_path) in msg and "\n" not in msg
    assert "[in_q QuantizeLinear] per-channel scale on an activation" in msg
    assert "[in_dq DequantizeLinear] per-channel scale on an activation" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_build_refuses_ort_int8_before_tensorrt(fake, tmp_path):
    trt, _ = fake()
    onnx_path = write_onnx(tmp_path / "model.onnx", tiny_onnx(small_spec(), qdq={"act_zp": 128,
                                                                               "zp_type": onnx.TensorProto.UINT8}))
    with pytest.raises(ExportError):
        build_engine(onnx_path, tmp_path / "m.engine", small_spec(), "int8", log=None)
    assert trt._fake.log == []  # never reached the builder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_build_failure_writes_nothing(fake, tmp_path):
    fake()
    # a fixed-batch-4 ONNX asked for batch 4 builds; its profile must match the static dims
    onnx_path = write_onnx(tmp_path / "model.onnx", tiny_onnx(small_spec(), dynamic=False))
    engine, cache = tmp_path / "m.engine", tmp_path / "t.cache"
    with pytest.raises(ExportError, match="fixed batch of 1"):
        build_engine(onnx_path, engine, small_spec(), "fp32", batch=(1, 2, 4), timing_cache=str(cache), log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_build_rejects_bad_arguments(fake, tmp_path, onnx_file):
    fake()
    engine = tmp_path / "m.engine"
    with pytest.raises(ExportError, match="precision"):
        build_engine(onnx_file, engine, small_spec(), "int4", log=None)
    with pytest.raises(ExportError, match="min <= opt <= max"):
        build_engine(onnx_file, engine, small_spec(), "fp32", batch=(4, 2, 8), log=None)
    with pytest.raises(ExportError, match="not found"):
        build_engine(tmp_path / "missing.onnx", engine, small_spec(), "fp32", log=None)
    fixed = write_onnx(tmp_path / "fixed.onnx", tiny_onnx(small_spec(), dynamic=False))
    build_engine(fixed, engine, small_spec(), "fp32", batch=1, log=None)  # fixed batch 1 is fine
    engine.unlink()
    sidecar_path(engine).unlink()
    other = ModelSpec(64, 64, 3, False, small_spec().heads, (), {})
    with pytest.raises(ModelMismatch, match=r"\[-1, 3, 32, 64\].*\[N, 3, 64, 64\]"):
        build_engine(onnx_file, engine, other, "fp32", log=None)
    assert not engine.exists() and not sidecar_path(engine).exists()


# -- runner against the fake tensorrt + fake cudart -------------------------------------------------
def built_engine(fake, tmp_path, onnx_path, version=TRT_VERSION, batch=(1, 2, 4)):
    trt, cudart = fake(version)
    engine = tmp_path / "m.engine"
    build_engine(onnx_path, engine, small_spec(), "fp32", batch=batch,
                 source={"cfg_sha256": SHA_A, "weights_sha256": SHA_B}, log=None)
    return engine, trt, cudart


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_runner_infer_matches_onnxruntime(fake, tmp_path, onnx_file, version):
    engine, trt, cudart = built_engine(fake, tmp_path, onnx_file, version)
    rng = np.random.default_rng(0)
    with TensorRTRunner(engine, cfg_sha256=SHA_A, weights_sha256=SHA_B) as r:
        assert r.spec == small_spec()  # from the sidecar
        assert r.batch_range == (1, 4)
        # one device + one pinned host buffer per tensor, sized for batch 4, allocated once
        sizes = sorted(n for c, n in cudart.calls if c == "cudaMalloc")
        assert sizes == sorted(4 * 4 * v for v in (3 * 32 * 64, 21 * 1 * 2, 21 * 2 * 4))
        assert len(cudart.pinned) == 3 and len(cudart.streams) == 1
        for n in (1, 4, 3, 2):  # every batch size changes the input shape: set before each enqueue
            x = rng.standard_normal((n, 3, 32, 64), dtype=np.float32)
            heads = r.infer(x)
            assert cudart.pending() == 0
            assert [h.shape for h in heads] == [(n, 21, 1, 2), (n, 21, 2, 4)]  # spec.heads order, by name
            for got, want in zip(heads, ort_heads(onnx_file, x)):
                assert got.dtype == np.float32
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        kept = heads[0].copy()
        r.infer(rng.standard_normal((2, 3, 32, 64), dtype=np.float32) + 5)
        np.testing.assert_array_equal(heads[0], kept)  # results are copies, not views of the buffers
        assert sum(c == "cudaMalloc" for c, *_ in cudart.calls) == 3  # reused, not reallocated
        with pytest.raises(DarkconvError, match=r"batch of 5 is outside this engine's batch range 1\.\.4"):
            r.infer(np.zeros((5, 3, 32, 64), np.float32))
        with pytest.raises(ModelMismatch, match=r"\[1, 3, 64, 64\]"):
            r.infer(np.zeros((1, 3, 64, 64), np.float32))
        assert f"tensorrt {version} fp32" in r.describe()
    assert trt._fake.errors == []
    # deactivate freed everything
    assert cudart.device == {} and cudart.pinned == {} and cudart.streams == {}


def test_runner_int8_qdq_engine(fake, tmp_path):
    """darkconv-style Q/DQ ONNX (symmetric int8, per-channel weights) parses, builds and runs."""
    onnx_path = write_onnx(tmp_path / "q.onnx", tiny_onnx(small_spec(), qdq={}))
    engine, trt, cudart = built_engine(fake, tmp_path, onnx_path, "11.4.0.106")
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 64), dtype=np.float32)
    with TensorRTRunner(engine) as r:
        heads = r.infer(x)
    for got, want in zip(heads, ort_heads(onnx_path, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_runner_half_precision_io(fake, tmp_path):
    onnx_path = write_onnx(tmp_path / "h.onnx", tiny_onnx(small_spec(), fp16=True))
    engine, trt, cudart = built_engine(fake, tmp_path, onnx_path, batch=(1, 1, 2))
    del trt.nptype  # also covers bindings without trt.nptype (dtype looked up by name)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 64), dtype=np.float32)
    with TensorRTRunner(engine) as r:
        assert r._buffers["images"].dtype == np.float16
        heads = r.infer(x)
    assert all(h.dtype == np.float32 for h in heads)
    for got, want in zip(heads, ort_heads(onnx_path, x)):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_runner_refuses_mismatches(fake, tmp_path, onnx_file, monkeypatch):
    engine, trt, cudart = built_engine(fake, tmp_path, onnx_file)
    with pytest.raises(ModelMismatch, match="weights_sha256"):
        TensorRTRunner(engine, weights_sha256="f" * 64).activate()
    with pytest.raises(ModelMismatch, match="input shape"):
        TensorRTRunner(engine, spec=ModelSpec(96, 32, 3, False, small_spec().heads)).activate()
    trt11, _ = fake("11.4.0.106")
    with pytest.raises(ModelMismatch, match=r"tensorrt is 10\.13\.3\.9 in the engine but this machine has 11\.4"):
        TensorRTRunner(engine).activate()
    assert not any(c[0] == "deserialize_cuda_engine" for c in trt11._fake.log)  # refused before loading
    trt, _ = fake()
    data = engine.read_bytes()
    engine.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ModelMismatch, match="not the one its sidecar describes"):
        TensorRTRunner(engine).activate()
    sidecar_path(engine).unlink()
    with pytest.raises(ModelMismatch, match="no sidecar"):
        TensorRTRunner(engine).activate()
    assert not any(c[0] == "deserialize_cuda_engine" for c in trt._fake.log)


def test_runner_engine_from_other_trt_is_not_deserialized(fake, tmp_path, onnx_file):
    """Even with a forged sidecar, the real runtime returns None for another version's plan."""
    engine, trt, _ = built_engine(fake, tmp_path, onnx_file)
    sc = read_sidecar(engine)
    trt, cudart = fake("10.0.1")
    write_sidecar(sidecar_path(engine), {**sc, "tensorrt": "10.0.1"})
    with pytest.raises(ModelMismatch, match="could not deserialize"):
        TensorRTRunner(engine).activate()
    assert cudart.device == {} and cudart.streams == {}


def test_runner_missing_head_output_and_cleanup_on_failure(fake, tmp_path):
    other = ModelSpec(64, 32, 3, False, (HeadSpec("yolo", 30, 2, ((1, 1),) * 3, (), (1, 2)),))
    onnx_path = write_onnx(tmp_path / "o.onnx", tiny_onnx(other))
    trt, cudart = fake()
    engine = tmp_path / "m.engine"
    build_engine(onnx_path, engine, small_spec(), "fp32", batch=(1, 1, 4), log=None)  # ONNX of another model
    with pytest.raises(ModelMismatch, match=r"missing \['head_16', 'head_23'\]"):
        TensorRTRunner(engine).activate()
    assert cudart.device == {} and cudart.streams == {}
    engine2 = tmp_path / "m2.engine"
    build_engine(write_onnx(tmp_path / "s.onnx", tiny_onnx(small_spec())), engine2, small_spec(), "fp32",
                 batch=(1, 1, 4), log=None)
    cudart.fail_malloc = True
    r = TensorRTRunner(engine2)
    with pytest.raises(DarkconvError, match="cudaMalloc.*cudaErrorMemoryAllocation"):
        r.activate()
    assert cudart.device == {} and cudart.pinned == {} and cudart.streams == {}
    with pytest.raises(DarkconvError, match="before activate"):
        r.infer(np.zeros((1, 3, 32, 64), np.float32))


@pytest.mark.slow
def test_darkconv_exports_through_fake_tensorrt(fake, tmp_path):
    """darkconv's own FP16 and TensorRT-flavoured INT8 exports pass the fake parser's Q/DQ rules (written
    from NVIDIA's docs, independent of export/quantize.py), build, and run through the runner with
    ONNX Runtime's numbers; the ONNX Runtime-flavoured INT8 (U8S8, INT32 bias) is what the parser refuses."""
    import darkconv
    from darkconv.export.onnx import export_onnx
    from fake_trt.onnx_rules import parser_errors
    model = darkconv.load(ROOT / "cfg" / "yolov3-tiny.cfg", width=96, height=96).randomize(0)
    spec = model.spec
    imgs = [np.random.default_rng(i).integers(0, 255, (120, 160, 3), dtype=np.uint8) for i in range(3)]
    ort_q = export_onnx(model, tmp_path / "ort-int8.onnx", precision="int8", batch="dynamic", calib_images=imgs,
                        int8_target="onnxruntime")
    msgs = [m for *_n, m in parser_errors(onnx.load(str(ort_q)))]
    assert any("zero point must be 0" in m for m in msgs) and any("INT32" in m for m in msgs)
    x = np.random.default_rng(0).random((2, 3, 96, 96), dtype=np.float32)
    for precision, kw, version in (("fp16", {}, "10.13.3.9"),
                                   ("int8", {"calib_images": imgs, "int8_target": "tensorrt"}, "11.4.0.106")):
        onnx_path = export_onnx(model, tmp_path / f"m-{precision}.onnx", precision=precision, batch="dynamic", **kw)
        trt, _ = fake(version)
        engine = tmp_path / f"m-{precision}.engine"
        build_engine(onnx_path, engine, spec, precision, batch=(1, 2, 2), log=None)
        with TensorRTRunner(engine) as r:
            got = r.infer(x)
        want = ort_heads(onnx_path, x, spec)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        assert trt._fake.errors == []


# -- names: everything the code calls exists in the real bindings ------------------------------------
TRT_MODULES = ("darkconv/export/tensorrt.py", "darkconv/runners/tensorrt.py", "darkconv/tensorrt_support.py")
# which real class each receiver expression in the two modules is (checked: an unknown receiver of a
# TensorRT/cuda object fails test_every_receiver_is_mapped, so new code cannot slip past)
RECEIVERS = {
    "export": {"builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
               "config": "IBuilderConfig", "profile": "IOptimizationProfile", "e": "ParserError",
               "inp": "ITensor", "t": "ITensor", "config.get_timing_cache()": "ITimingCache", "trt.Logger": "Logger"},
    "runners": {"engine": "ICudaEngine", "self._engine": "ICudaEngine", "ctx": "IExecutionContext",
                "self._context": "IExecutionContext", "self._runtime": "Runtime", "trt.Logger": "Logger"},
}
NOT_TRT = {"np", "self", "buf", "inp", "Path", "p", "hashlib", "json", "ctypes", "sidecar", "spec", "src", "s",
           "torch", "torch.cuda", "h", "onnx", "proto", "n", "out", "d", "b", "prop", "name", "text", "engine_path",
           "onnx_path", "cache_path", "self.spec", "self.engine_path", "self.sidecar", "self._buffers", "dt", "raw",
           "ModelSpec", "eng", "self._trt", "self._cudart", "self.dtype", "engine_path.parent", "proto.graph",
           "batch", "x", "err", "buf.dtype", "errs", "side", "where"}


def _kind(mod: str) -> str:
    return "runners" if "runners" in mod else "export"


def _attribute_uses():
    """(module, receiver source, attribute) for every attribute access in the two modules."""
    out = []
    for mod in TRT_MODULES:
        tree = ast.parse((ROOT / mod).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                out.append((mod, ast.unparse(node.value), node.attr))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr",
                                                                                                    "hasattr"):
                if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                    out.append((mod, ast.unparse(node.args[0]), node.args[1].value))
    return out


def _uses():
    trt_names, cuda_names, members = set(), set(), set()
    for _mod, recv, attr in _attribute_uses():
        if recv == "trt":
            trt_names.add(attr)
        elif recv.startswith("trt.") and recv.count(".") == 1 and recv != "trt.Logger":
            members.add((recv[4:], attr, "enum"))
        elif recv == "cudart":
            cuda_names.add(attr)
        elif recv in RECEIVERS[_kind(_mod)]:
            members.add((RECEIVERS[_kind(_mod)][recv], attr, "class"))
    return trt_names, cuda_names, members


def test_every_receiver_is_mapped():
    """Each attribute access on a (dotted) name is on a known TensorRT/cuda object or a known other name."""
    import re
    unknown = sorted({recv for mod, recv, _a in _attribute_uses()
                      if re.fullmatch(r"[A-Za-z_][\w.]*", recv) and recv not in RECEIVERS[_kind(mod)]
                      and recv not in NOT_TRT and recv not in ("trt", "cudart")
                      and not recv.startswith("trt.") and not recv.startswith("cudart.cudaMemcpyKind")})
    assert not unknown, f"classify these receivers in RECEIVERS (TensorRT class) or NOT_TRT: {unknown}"


# names the code reads only through getattr/hasattr with a fallback (may be absent in some versions)
OPTIONAL = {("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"), ("trt", "nptype"), ("ParserError", "node_name"),
            ("ParserError", "node_operator"), ("ParserError", "desc"), ("trt", "__version__")}


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_tensorrt_names_exist_in_real_bindings(version):
    real = symbols.trt(version)
    trt_names, _cuda, members = _uses()
    assert {"Builder", "OnnxParser", "Runtime", "MemoryPoolType", "TensorIOMode"} <= trt_names  # the walk works
    missing = sorted(n for n in trt_names if n not in real["module"] and n != "__version__"
                     and ("trt", n) not in OPTIONAL)
    assert not missing, f"TensorRT {version} has no {missing}"
    bad = []
    for owner, attr, kind in sorted(members):
        table = real["enums"] if kind == "enum" else real["classes"]
        if owner not in table:
            bad.append(f"{owner} (not recorded)")
        elif attr not in table[owner] and (owner, attr) not in OPTIONAL:
            bad.append(f"{owner}.{attr}")
    assert not bad, f"not in TensorRT {version}'s bindings: {bad}"
    assert ("IExecutionContext", "execute_async_v3", "class") in members


def _params(sig: str) -> list[str]:
    """'f(self: X, name: str, shape: tuple) -> bool' -> ['name', 'shape']."""
    import re
    inner = sig[sig.index("(") + 1: sig.rindex(") ->")]
    return [n for n in re.findall(r"(?:^|, )(\w+):", inner) if n != "self"]


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_signatures_match_real_bindings(version):
    """The fake's methods take the real parameters (names, in order), and every keyword argument
    darkconv passes is a real parameter name (a wrong one is a TypeError on real TensorRT)."""
    import inspect
    real = symbols.trt(version)["signatures"]
    trt = make_tensorrt(version, FakeCudart())
    checked = 0
    for key, sigs in real.items():
        cls_name, meth = key.split(".")
        cls = getattr(trt, cls_name, None)
        if cls is None or not hasattr(cls, meth):
            continue
        fake_params = [p for p in inspect.signature(getattr(cls, meth)).parameters if p != "self"]
        assert any(fake_params == _params(s) for s in sigs), f"fake {key}{fake_params} vs real {sigs}"
        checked += 1
    assert checked >= 25
    for mod in TRT_MODULES:
        for node in ast.walk(ast.parse((ROOT / mod).read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                recv = ast.unparse(node.func.value)
                cls_name = RECEIVERS[_kind(mod)].get(recv) or (recv[4:] if recv.startswith("trt.") else None)
                key = f"{cls_name}.{node.func.attr}" if cls_name else None
                if recv == "trt":  # a constructor: trt.Builder(logger)
                    key = f"{node.func.attr}.__init__"
                if key in real:
                    params = [_params(s) for s in real[key]]
                    assert any(len(node.args) <= len(p) and all(k.arg in p for k in node.keywords)
                               for p in params), f"{mod}: {ast.unparse(node)} does not fit {real[key]}"


@pytest.mark.parametrize("version", symbols.CUDA_VERSIONS)
def test_cuda_names_exist_in_real_cuda_bindings(version):
    real = symbols.cuda(version)
    _t, cuda_names, _m = _uses()
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaStreamSynchronize"} <= cuda_names
    missing = sorted(n for n in cuda_names if n not in real["runtime"])
    assert not missing, f"cuda-bindings {version} runtime has no {missing}"
    assert {"cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"} <= set(real["enums"]["cudaMemcpyKind"])


@pytest.mark.slow
def test_mutations_are_caught():
    """scripts/trt_mutations.py: each seeded bug in the runner/builder makes a TensorRT test fail
    (about 40-60 s: one in-process pytest run per mutation)."""
    import subprocess
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "trt_mutations.py"), "--quiet"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


# -- real TensorRT (skipped here) ------------------------------------------------------------------
def _real_gpu() -> str | None:
    try:
        return "%s (sm %s)" % gpu_info()
    except BackendUnavailable:
        return None
    except Exception:  # noqa: BLE001
        return None


_TRT = trt_available()
needs_trt = pytest.mark.skipif(_TRT is None, reason="TensorRT not installed")
needs_gpu = pytest.mark.skipif(_TRT is not None and _real_gpu() is None, reason="no CUDA GPU")
CFG = ROOT / "cfg" / "yolov3-tiny.cfg"


@pytest.fixture(scope="module")
def real_model():
    import darkconv
    return darkconv.load(CFG, width=160, height=128).randomize(0)


def _ort_heads(onnx_path, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})


def _rel_err(a, b):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max() / (np.abs(b).max() + 1e-6))


@needs_trt
@needs_gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-2), ("fp16", 3e-2)])
def test_real_engine_matches_onnxruntime(real_model, tmp_path, precision, tol):
    from darkconv.export.onnx import export_onnx
    onnx_path = export_onnx(real_model, tmp_path / f"m-{precision}.onnx", precision=precision, batch="dynamic")
    engine, cache = tmp_path / f"m-{precision}.engine", tmp_path / "timing.cache"
    spec = real_model.spec
    sc = build_engine(onnx_path, engine, spec, precision, batch=(1, 2, 4), workspace_gb=1.0,
                      timing_cache=str(cache), source={"cfg": str(CFG)}, log=print)
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
    assert read_sidecar(engine) == sc and sc["tensorrt"] == _TRT
    rng = np.random.default_rng(0)
    with TensorRTRunner(engine, spec=spec, cfg_sha256=sc["cfg_sha256"]) as r:
        for n in (1, 3, 4):
            x = rng.random((n, 3, spec.height, spec.width), dtype=np.float32)
            got = r.infer(x)
            want = _ort_heads(onnx_path, x)
            assert [g.shape for g in got] == [w.shape for w in want]
            assert [g.shape[1:] for g in got] == [(h.channels, *h.grid) for h in spec.heads]
            for g, w in zip(got, want):
                assert g.dtype == np.float32
                assert _rel_err(g, w) < tol
        with pytest.raises(DarkconvError, match="outside this engine's batch range"):
            r.infer(np.zeros((5, 3, spec.height, spec.width), np.float32))


@needs_trt
@needs_gpu
def test_real_engine_refused_after_trt_version_change(real_model, tmp_path):
    from darkconv.export.onnx import export_onnx
    onnx_path = export_onnx(real_model, tmp_path / "m.onnx", batch="dynamic")
    engine = tmp_path / "m.engine"
    sc = build_engine(onnx_path, engine, real_model.spec, "fp32", log=print)
    write_sidecar(sidecar_path(engine), {**sc, "tensorrt": "9.0.0.1"})
    with pytest.raises(ModelMismatch, match="tensorrt is 9.0.0.1"):
        TensorRTRunner(engine).activate()

