"""The torch runner's device choice (``--device`` on bench, parity, detect), FP16 and CUDA graphs.

CPU-side: argument validation and the one-line errors. GPU-side tests skip with the reason
"no CUDA GPU on this machine" where ``torch.cuda.is_available()`` is False.
"""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from darkconv.cli import main
from darkconv.errors import BackendUnavailable, DarkconvError
from darkconv.runners.torch import TorchRunner, parse_device, resolve_device

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "cfg" / "yolov3-tiny.cfg"
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")


def fake_torch(available: bool, count: int = 0, build: str | None = "12.8"):
    """Just the torch attributes resolve_device reads (what a CUDA / CPU-only PyTorch reports)."""
    return types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: available,
                                                            device_count=lambda: count),
                                 version=types.SimpleNamespace(cuda=build))


@pytest.mark.parametrize("given,want", [(None, None), ("auto", None), ("", None), ("cpu", "cpu"), ("CUDA", "cuda"),
                                        ("gpu", "cuda"), ("cuda:1", "cuda:1"), (" cuda:0 ", "cuda:0")])
def test_parse_device(given, want):
    assert parse_device(given) == want


@pytest.mark.parametrize("bad", ["tpu", "cuda:", "cuda:x", "cuda0", "mps"])
def test_parse_device_refuses(bad):
    with pytest.raises(DarkconvError, match=r"unknown device .*cpu \| cuda \| cuda:N"):
        parse_device(bad)


def test_resolve_device():
    assert resolve_device(None, fake_torch(False)) == "cpu"
    assert resolve_device(None, fake_torch(True, 1)) == "cuda"
    assert resolve_device("cpu", fake_torch(True, 1)) == "cpu"
    assert resolve_device("cuda:1", fake_torch(True, 2)) == "cuda:1"
    with pytest.raises(BackendUnavailable, match=r"--device cuda: no CUDA GPU: this PyTorch is a CPU-only build; "
                                                 r"install a CUDA build of PyTorch .* or use --device cpu"):
        resolve_device("cuda", fake_torch(False, build=None))
    with pytest.raises(BackendUnavailable, match=r"PyTorch \(CUDA 12\.8\) sees no GPU .*driver"):
        resolve_device("cuda", fake_torch(False))
    with pytest.raises(BackendUnavailable, match=r"sees 1 CUDA device\(s\) \(cuda:0\.\.cuda:0\)"):
        resolve_device("cuda:1", fake_torch(True, 1))


def test_runner_argument_checks():
    with pytest.raises(DarkconvError, match="fp32 or fp16, not int8"):
        TorchRunner(CFG, precision="int8")
    with pytest.raises(DarkconvError, match="unknown device"):
        TorchRunner(CFG, device="tpu")
    with pytest.raises(DarkconvError, match="CUDA graphs need --device cuda"):
        TorchRunner(CFG, width=64, height=64, device="cpu", cuda_graphs=True).activate()


def test_runner_on_cpu_fp16_stays_fp32():
    import darkconv
    model = darkconv.load(CFG, width=64, height=64).randomize(0)
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    with TorchRunner(None, model=model, device="cpu", precision="fp16") as r:
        heads = r.infer(x)
        assert r.describe() == "torch (cpu, fp32)"
    with TorchRunner(None, model=model, device="cpu") as r:
        np.testing.assert_array_equal(heads[0], r.infer(x)[0])


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is present, so the no-GPU error cannot occur")
@pytest.mark.parametrize("command", [
    ["bench", CFG, "--iters", "1"],
    ["detect", CFG, "unread.weights", ROOT / "darkconv" / "data" / "dog.jpg"],  # refused before reading it
    ["parity", CFG, CFG],
])
def test_cli_device_cuda_without_gpu(command, tmp_path):
    r = invoke(*command, "--device", "cuda")
    assert r.exit_code == 3, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("darkconv: error: --device cuda: no CUDA GPU")
    assert "install a CUDA build of PyTorch" in lines[0] and "--device cpu" in lines[0]


@pytest.mark.parametrize("command,where", [
    (["bench", CFG, "--backend", "onnxruntime", "--iters", "1"], "onnxruntime"),
    (["parity", CFG, CFG, "--backends", "onnxruntime,opencv"], "onnxruntime, opencv"),
])
def test_cli_device_only_for_torch(command, where):
    r = invoke(*command, "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert f"--device applies to the torch backend, not {where}" in r.output


@pytest.mark.parametrize("extra", [["--device", "cpu"], ["--backend", "onnxruntime"]])
def test_cli_cuda_graphs_need_torch_on_cuda(extra):
    r = invoke("bench", CFG, "--cuda-graphs", "--iters", "1", *extra)
    assert r.exit_code == 2 and "CUDA graphs are for the torch backend on --device cuda" in r.output, r.output


def test_cli_device_bad_value():
    r = invoke("bench", CFG, "--device", "tpu")
    assert r.exit_code == 2 and "unknown device 'tpu'" in r.output


def test_cli_bench_device_cpu(tmp_path):
    import json
    out = tmp_path / "b.json"
    r = invoke("bench", CFG, "--size", "64x64", "--device", "cpu", "--iters", "1", "--warmup", "0",
               "--precision", "fp16", "--json", out)
    assert r.exit_code == 0, r.output
    assert "torch on CPU runs FP32" in r.output
    assert json.loads(out.read_text())["results"]


# -- on a CUDA GPU ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    import darkconv
    return darkconv.load(CFG, width=160, height=128).randomize(0)


def _cpu_heads(model, x):
    with TorchRunner(None, model=model, device="cpu") as r:
        return r.infer(x)


@needs_cuda
def test_cuda_fp32_matches_cpu(small_model):
    x = np.random.default_rng(0).random((2, 3, 128, 160), dtype=np.float32)
    want = _cpu_heads(small_model, x)
    with TorchRunner(None, model=small_model, device="cuda") as r:
        got = r.infer(x)
        assert "cuda" in r.describe()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3)
    small_model.to("cpu")


@needs_cuda
def test_cuda_fp16_close_to_fp32(small_model):
    x = np.random.default_rng(1).random((2, 3, 128, 160), dtype=np.float32)
    want = _cpu_heads(small_model, x)
    with TorchRunner(None, model=small_model, device="cuda", precision="fp16") as r:
        got = r.infer(x)
        assert "fp16" in r.describe()
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        assert np.abs(g - w).max() / (np.abs(w).max() + 1e-6) < 2e-2
    small_model.to("cpu", torch.float32)


@needs_cuda
def test_cuda_graphs_equal_eager(small_model):
    rng = np.random.default_rng(2)
    with TorchRunner(None, model=small_model, device="cuda") as r:
        eager = {n: r.infer(x) for n, x in ((n, rng.random((n, 3, 128, 160), dtype=np.float32)) for n in (1, 3))}
    rng = np.random.default_rng(2)
    with TorchRunner(None, model=small_model, device="cuda", cuda_graphs=True) as r:
        for n in (1, 3):
            x = rng.random((n, 3, 128, 160), dtype=np.float32)
            for _ in range(2):  # recorded, then replayed
                for g, w in zip(r.infer(x), eager[n]):
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        assert len(r._graphs) == 2
    small_model.to("cpu")


@needs_cuda
def test_cli_bench_device_cuda(tmp_path):
    for graphs in ([], ["--cuda-graphs"]):
        r = invoke("bench", CFG, "--size", "160x128", "--device", "cuda", "--precision", "fp16", "--iters", "3",
                   "--batch", "1,2", *graphs)
        assert r.exit_code == 0, r.output
        assert "cuda" in r.output
