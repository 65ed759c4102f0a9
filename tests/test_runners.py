"""The runner output contract: heads by name, in ``spec.heads`` order, whatever order the backend lists them.

A model whose ONNX / served outputs come in another order than its heads must still give the heads
in spec order (a positional mapping would hand the 26x26 head to the 13x13 decoder); one that
lacks a head is refused when it is opened, with a message naming the missing output.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import darkconv
from darkconv.errors import DarkconvError, ModelMismatch
from darkconv.export.onnx import to_onnx_model
from darkconv.runners import runner_class
from darkconv.runners.base import outputs_by_name

CFG = Path(__file__).resolve().parents[1] / "cfg" / "yolov3-tiny.cfg"


@pytest.fixture(scope="module")
def small_model():
    """Random-weight yolov3-tiny at 128x128 (two heads, 4x4 and 8x8) and one input."""
    model = darkconv.load(CFG, width=128, height=128).randomize(0)
    x = np.random.default_rng(0).random((2, 3, 128, 128), dtype=np.float32)
    with torch.no_grad():
        ref = [h.numpy() for h in model(torch.from_numpy(x))]
    return model, x, ref


def _reordered_onnx(model, path: Path) -> Path:
    proto = to_onnx_model(model)
    outs = list(proto.graph.output)
    assert [o.name for o in outs] == model.spec.head_names
    del proto.graph.output[:]
    proto.graph.output.extend(reversed(outs))  # the artifact lists its heads last-first
    onnx.save(proto, str(path))
    return path


def test_outputs_by_name_orders_and_refuses_missing():
    model = darkconv.load(CFG, width=128, height=128)
    names = model.spec.head_names
    assert names == ["head_16", "head_23"]
    assert outputs_by_name(model.spec, list(reversed(names)) + ["extra"]) == names
    with pytest.raises(ModelMismatch, match=r"missing \['head_23'\]"):
        outputs_by_name(model.spec, ["head_16", "head_22"], where="m.onnx")


def test_onnxruntime_reordered_outputs_give_spec_order(small_model, tmp_path):
    model, x, ref = small_model
    path = _reordered_onnx(model, tmp_path / "reordered.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["head_23", "head_16"]
    with runner_class("onnxruntime")(path, threads=1) as r:
        heads = r.infer(x)
    assert [h.shape for h in heads] == [(2, 255, 4, 4), (2, 255, 8, 8)]
    for got, want in zip(heads, ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_onnxruntime_missing_head_is_refused_at_open(small_model, tmp_path):
    model, _, _ = small_model
    proto = to_onnx_model(model)
    old = proto.graph.output[1].name
    for node in proto.graph.node:  # rename the second head's tensor everywhere
        node.output[:] = ["renamed" if o == old else o for o in node.output]
    proto.graph.output[1].name = "renamed"
    path = tmp_path / "renamed.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(DarkconvError, match=r"missing \['head_23'\]"):
        with runner_class("onnxruntime")(path, threads=1):
            pass


def test_torch_runner_picks_heads_by_name(small_model):
    model, x, ref = small_model
    m = darkconv.load(CFG, width=128, height=128)
    m.load_state_dict(model.state_dict())
    m.spec = replace(m.spec, heads=tuple(reversed(m.spec.heads)))  # spec order != the module's head order
    with runner_class("torch")(CFG, model=m, device="cpu") as r:
        heads = r.infer(x)
    assert [h.shape[-1] for h in heads] == [8, 4]
    np.testing.assert_allclose(heads[0], ref[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(heads[1], ref[0], rtol=1e-5, atol=1e-5)


def test_triton_runner_reads_outputs_by_name(small_model, monkeypatch):
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")
    from darkconv.runners import triton as tr

    model, _, _ = small_model
    spec = model.spec
    config = {"parameters": {tr.SPEC_PARAM: {"string_value": spec.to_json()}}, "max_batch_size": 4,
              "output": [{"name": n} for n in reversed(spec.head_names)]}
    monkeypatch.setattr(tr.TritonRunner, "_config", lambda self, ep: config)
    r = tr.TritonRunner("m", "localhost:8000")
    assert r.outputs == spec.head_names
    config["output"] = [{"name": "head_16"}]
    with pytest.raises(ModelMismatch, match=r"missing \['head_23'\]"):
        tr.TritonRunner("m", "localhost:8000")


# -- pipeline.open_runner: the one way to open a model (bench's options included) -----------------
def test_open_runner_report_random_weights_and_refusals(tmp_path):
    from darkconv.pipeline import RANDOM_WEIGHTS, open_runner

    x = np.random.default_rng(1).random((1, 3, 64, 64), dtype=np.float32)
    report: dict = {}
    r = open_runner(CFG, None, "onnxruntime", width=64, height=64, threads=1, workdir=str(tmp_path),
                    random_weights=True, report=report)
    assert report["precision"] == "fp32" and report["notes"] == [RANDOM_WEIGHTS]
    assert report["model_load_s"] >= 0 and report["export_s"] > 0
    with r:
        a = r.infer(x)
    with open_runner(CFG, None, "torch", width=64, height=64, random_weights=True) as t:
        b = t.infer(x)
    for u, v in zip(a, b):  # the same deterministic random weights on both backends
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)
    onnx_path = next(tmp_path.glob("*.onnx"))
    with pytest.raises(DarkconvError, match="takes 64x64 input: --size only applies to a cfg"):
        open_runner(onnx_path, width=128, height=128)
    with pytest.raises(DarkconvError, match="the tensorrt backend runs engines"):
        open_runner(CFG, None, "tensorrt")
    with pytest.raises(DarkconvError, match="the torch backend has no INT8"):
        open_runner(CFG, None, "torch", precision="int8")
    with pytest.raises(DarkconvError, match="INT8 needs calibration images"):
        open_runner(CFG, None, "onnxruntime", precision="int8")
