"""The model spec from the cfg alone (darkconv/darknet/shapes.py), with torch unavailable.

* ``darkconv.darknet.spec.spec_from_cfg`` runs in a process where ``import torch`` fails, on every cfg
  the project ships (and a synthetic cfg with every supported section type), and gives the same
  spec as the graph (DarknetModel), at the cfg's size and at another.
* The torch-free per-layer shapes and .weights layout equal the graph's, layer by layer.
* The OpenCV runner opens, runs and gives Darknet's numbers without importing torch.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from darkconv.darknet.cfg import parse_cfg
from darkconv.darknet.shapes import layer_shapes, tensor_layout
from darkconv.graph.model import build_model

ROOT = Path(__file__).resolve().parents[1]
CFGS = sorted(ROOT.glob("cfg/*.cfg")) + sorted(ROOT.glob("darkconv/data/*.cfg"))
NO_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` raises ImportError

#: one of each section type darkconv builds (shapes: 64x64 -> ... -> a [yolo] at 8x8, a [region] at 1x1)
EVERY_SECTION = """
[net]
width=64
height=64
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky
[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
antialiasing=1
activation=mish
[maxpool]
size=2
stride=2
antialiasing=1
[maxpool]
maxpool_depth=1
out_channels=4
[route]
layers=-2
[local_avgpool]
size=2
stride=1
[convolutional]
filters=8
size=3
dilation=2
pad=1
activation=swish
[shortcut]
from=-3
weights_type=per_channel
weights_normalization=softmax
activation=linear
[avgpool]
[convolutional]
filters=8
size=1
activation=logistic
[scale_channels]
from=-4
[sam]
from=-5
[upsample]
stride=-2
[reorg3d]
stride=2
[reorg]
stride=2
[upsample]
stride=4
[batchnorm]
[activation]
activation=leaky
[dropout]
probability=0.1
[route]
layers=-1,12
groups=2
group_id=1
[convolutional]
filters=18
size=1
activation=linear
[yolo]
mask=0,1,2
anchors=4,5, 8,9, 12,14
classes=1
num=3
scale_x_y=1.05
nms_kind=diounms
[route]
layers=13
[connected]
output=12
batch_normalize=1
activation=linear
[softmax]
groups=1
[convolutional]
filters=12
size=1
stride_x=1
stride_y=1
activation=linear
[region]
anchors=1,1, 2,2
classes=1
num=2
softmax=1
"""


@pytest.fixture(scope="module")
def cfg_files(tmp_path_factory):
    extra = tmp_path_factory.mktemp("cfg") / "every-section.cfg"
    extra.write_text(EVERY_SECTION)
    return [*CFGS, extra]


def _sizes(path: Path):
    return [None] if path.name == "every-section.cfg" else [None, (320, 256)]


def _graph_spec(path: Path, size):
    w, h = size or (None, None)
    d = build_model(path, w, h, init=False).spec.to_dict()
    d.pop("source")
    return d


def test_spec_without_torch_equals_the_graphs(cfg_files):
    assert len(CFGS) >= 9  # the project's own cfgs are there
    jobs = [(str(p), s) for p in cfg_files for s in _sizes(p)]
    code = NO_TORCH + (
        "import json\n"
        "from darkconv.darknet.spec import spec_from_cfg\n"
        "out = []\n"
        f"for path, size in {jobs!r}:\n"
        "    w, h = size or (None, None)\n"
        "    d = spec_from_cfg(path, w, h).to_dict(); d.pop('source'); out.append(d)\n"
        "assert sys.modules.get('torch') is None\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    for (path, size), spec in zip(jobs, got):
        want = json.loads(json.dumps(_graph_spec(Path(path), size)))  # tuples -> lists, as in the JSON
        assert spec == want, (path, size)
        assert spec["heads"], path


def test_layer_shapes_and_weights_layout_equal_the_graphs(cfg_files):
    for path in cfg_files:
        cfg = parse_cfg(path)
        model = build_model(path, init=False)
        assert layer_shapes(cfg, (model.spec.channels, model.spec.height, model.spec.width)) == \
            [tuple(s) for s in model.shapes], path
        assert tensor_layout(cfg) == [(i, s.type, name, t.numel()) for i, s, name, t in model.darknet_tensors()], path


def test_every_section_cfg_covers_the_registry(cfg_files):
    from darkconv.graph.registry import BUILDERS

    used = {s.type for s in parse_cfg(cfg_files[-1]).layers}
    assert set(BUILDERS) - used <= {"empty", "silence"}  # aliases of the identity, like [dropout]


def test_opencv_runner_needs_no_torch(default_model, default_torch_model, tmp_path):
    pytest.importorskip("cv2")
    import torch

    x = np.random.default_rng(0).random((1, 3, 416, 416), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    code = NO_TORCH + (
        "import numpy as np\n"
        "from darkconv.runners import runner_class\n"
        f"r = runner_class('opencv')({str(default_model.cfg)!r}, {str(default_model.weights)!r}, threads=2)\n"
        f"with r:\n    heads = r.infer(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.savez({str(tmp_path / 'heads.npz')!r}, *heads)\n"
        "print(r.spec.to_json())\n"
        "assert sys.modules.get('torch') is None\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    spec = json.loads(r.stdout.strip().splitlines()[-1])
    want = default_torch_model.spec.to_dict()
    assert spec["heads"] == json.loads(json.dumps(want["heads"]))
    got = np.load(tmp_path / "heads.npz")
    with torch.no_grad():
        ref = [h.numpy() for h in default_torch_model(torch.from_numpy(x))]
    for k, r_ in enumerate(ref):  # the tolerance of tests/test_oracle_opencv.py (BN eps shift included)
        assert np.abs(got[f"arr_{k}"] - r_).max() < 1e-4
