"""OpenCV DNN (``cv2.dnn.readNetFromDarknet``) as an independent implementation of Darknet's graph.

Compared: the raw tensors fed into every [yolo]/[region] head, taken in OpenCV from the layer just
before each head (``conv_i`` / ``bn_i``, or ``<activation>_<i+1>`` when that conv has an activation).

Two adjustments make OpenCV compute Darknet's numbers rather than its own:
* OpenCV's BatchNorm uses eps 1e-6 where Darknet uses 1e-5: OpenCV gets a copy of the weights with
  ``rolling_variance += 1e-5 - 1e-6`` (``test_opencv_sees_the_batchnorm_eps`` shows the test notices).
* OpenCV's Winograd 3x3 convolution kernels trade ~1e-5 relative accuracy per layer for speed; they are
  disabled so that differences come from the graph, not from the convolution algorithm.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import darkconv

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):  # pragma: no cover
    pytest.skip(f"OpenCV {cv2.__version__} has no Darknet importer", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
CFG_DIR = ROOT / "cfg"
IMAGE = ROOT / "darkconv" / "data" / "dog.jpg"
BN_EPS_SHIFT = 1e-5 - 1e-6


def opencv_net(cfg, weights):
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.enableWinograd(False)
    return net


def head_input_names(net, model) -> list[str]:
    """OpenCV's name for the output of the layer before each head (it names a conv's activation i+1)."""
    names = set(net.getLayerNames())
    out = []
    for hd in model.spec.heads:
        i = hd.layer - 1
        s = model.sections[i]
        assert s.type == "convolutional", f"layer {i} before head {hd.layer} is [{s.type}]"
        act = s.str("activation", "logistic")
        candidates = ([f"{act}_{i + 1}"] if act != "linear" else []) + [f"bn_{i}", f"conv_{i}"]
        found = [c for c in candidates if c in names]
        assert found, f"OpenCV has none of {candidates}"
        out.append(found[0])
    return out


def run_opencv(cfg, weights, model, x: np.ndarray) -> list[np.ndarray]:
    net = opencv_net(cfg, weights)
    net.setInput(np.ascontiguousarray(x, np.float32))
    return [np.array(o, np.float64) for o in net.forward(head_input_names(net, model))]


def opencv_weights(model, darknet_weights, path) -> None:
    """An OpenCV-only copy of a .weights file with the BatchNorm eps difference folded into the variances."""
    raw = Path(darknet_weights).read_bytes()
    head = 20 if int.from_bytes(raw[:4], "little") * 10 + int.from_bytes(raw[4:8], "little") >= 2 else 16
    floats = np.frombuffer(raw, "<f4", offset=head).copy()
    offset = 0
    for _, _, name, t in model.darknet_tensors():
        if name == "rolling_variance":
            floats[offset:offset + t.numel()] += np.float32(BN_EPS_SHIFT)
        offset += t.numel()
    assert offset == floats.size
    Path(path).write_bytes(raw[:head] + floats.tobytes())


# -- the real yolov3-tiny ------------------------------------------------------------------------
def image_batch(w, h) -> np.ndarray:
    img = cv2.imread(str(IMAGE))
    assert img is not None, IMAGE
    rgb = cv2.resize(img[:, :, ::-1], (w, h), interpolation=cv2.INTER_LINEAR)  # plain resize: graphs, not preprocessing
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], np.float32) / 255.0


@pytest.fixture(scope="module")
def real_tiny(default_model, default_torch_model, tmp_path_factory):
    m = default_torch_model  # shared, read only
    x = image_batch(m.spec.width, m.spec.height)
    with torch.no_grad():
        ref = [o.numpy().astype(np.float64) for o in m(torch.from_numpy(x))]
    cvw = tmp_path_factory.mktemp("real") / "opencv.weights"
    opencv_weights(m, default_model.weights, cvw)
    return m, x, ref, cvw


def test_real_yolov3_tiny_matches_opencv(real_tiny, default_model):
    """Raw heads are logits of magnitude ~20; float32 rounding over 13 convs gives ~2e-5 between two correct
    implementations (measured: 2.5e-5). An absolute 1e-4 (5e-6 of the largest output) is 4x that margin
    and well below what a real difference produces (BN eps 1e-6 instead of 1e-5 alone gives 8e-4)."""
    m, x, ref, cvw = real_tiny
    got = run_opencv(default_model.cfg, cvw, m, x)
    assert [g.shape for g in got] == [r.shape for r in ref] == [(1, 255, 13, 13), (1, 255, 26, 26)]
    for g, r in zip(got, ref):
        assert np.abs(r).max() > 5  # real logits, not a dead network
        assert np.abs(g - r).max() < 1e-4


def test_opencv_sees_the_batchnorm_eps(real_tiny, default_model):
    """Without the eps shift, OpenCV's 1e-6 differs visibly: the tolerance above is tight enough to matter."""
    m, x, ref, _ = real_tiny
    got = run_opencv(default_model.cfg, default_model.weights, m, x)
    assert max(np.abs(g - r).max() for g, r in zip(got, ref)) > 3e-4


# -- random weights on the reference cfgs ------------------------------------------------------------
# name: (width, height) -- small, some non-square, all multiples of 32
ORACLE_MODELS = {
    "yolov2-tiny": (192, 128),
    "yolov4-tiny": (192, 128),
    "yolov7-tiny": (192, 160),
    "yolov2": (160, 128),
    "yolov3": (192, 128),
    "yolov3-spp": (192, 160),
    "yolov4": (224, 192),  # smaller inputs make this random network chaotic (float32 error ~1e-2 at 128x128)
}
# yolov4-csp runs in OpenCV too (new_coords only changes the decoding) but adds ~15 s of its 52 M parameters
# for no new layer type: yolov4 has them all, yolov7-tiny the logistic conv before a new_coords head.


def resized_cfg(text: str, w: int, h: int) -> str:
    """The cfg with [net] width/height replaced (OpenCV takes the network size from the file)."""
    net_end = re.search(r"(?m)^\s*\[(?!net\]|network\])", text).start()
    head, rest = text[:net_end], text[net_end:]
    head = re.sub(r"(?m)^(\s*width\s*=).*$", rf"\g<1>{w}", head)
    head = re.sub(r"(?m)^(\s*height\s*=).*$", rf"\g<1>{h}", head)
    return head + rest


def make_random_weights(path: Path, name: str, w: int, h: int, seed: int) -> None:
    """Random, activation-normalized weights for a reference cfg at a small size, as a .weights file."""
    m = darkconv.load(CFG_DIR / f"{name}.cfg", width=w, height=h)
    m.randomize(seed)
    m.normalize_activations(oracle_input(w, h, seed))  # unit-scale conv outputs: heads land where exp/sigmoid matter
    m.save_weights(path)


def oracle_input(w: int, h: int, seed: int) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """name -> path of its random .weights file, generated once per session (the files are cached, not models)."""
    d = tmp_path_factory.mktemp("oracle-weights")

    def get(name: str, seed: int = 7) -> Path:
        path = d / f"{name}-{seed}.weights"
        if not path.exists():
            make_random_weights(path, name, *ORACLE_MODELS[name], seed)
        return path
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ORACLE_MODELS))
def test_random_weights_match_opencv(random_weights, tmp_path, name):
    """Tolerance: a random deep network amplifies float32 rounding (yolov4: ~1e-3 of max|out| between
    torch float32 and float64), so OpenCV's error against the float64 reference may be at most 4x darkconv's
    own float32 error, or 1e-4 of max|out| where that is larger. A wrong layer gives errors of order 1."""
    w, h = ORACLE_MODELS[name]
    cfg = CFG_DIR / f"{name}.cfg"
    model = darkconv.load(cfg, random_weights(name), width=w, height=h)
    x = oracle_input(w, h, 7)
    with torch.no_grad():
        ref32 = [o.numpy().astype(np.float64) for o in model(x)]
        ref64 = [o.numpy() for o in copy.deepcopy(model).double()(x.double())]
    cv_cfg = tmp_path / f"{name}-{w}x{h}.cfg"
    cv_cfg.write_text(resized_cfg(cfg.read_text(), w, h))
    assert darkconv.load(cv_cfg).spec.heads == model.spec.heads  # the same network as the size override
    cv_weights = tmp_path / "opencv.weights"
    opencv_weights(model, random_weights(name), cv_weights)
    try:
        got = run_opencv(cv_cfg, cv_weights, model, x.numpy())
    finally:
        cv_weights.unlink()  # hundreds of MB for the big models
    assert len(got) == len(ref64) == len(model.spec.heads)
    for g, r64, r32, hd in zip(got, ref64, ref32, model.spec.heads):
        assert g.shape == r64.shape == (1, hd.channels, *hd.grid)
        scale = np.abs(r64).max()
        assert scale > 0.5 and r64.std() > 0.05  # a live network
        own = np.abs(r32 - r64).max() / scale
        err = np.abs(g - r64).max() / scale
        assert own < 5e-3, f"the random network is too chaotic to compare ({own:.1e})"
        assert err <= max(1e-4, 4 * own), f"{name} head {hd.layer}: OpenCV differs by {err:.2e} of max|out| " \
                                          f"(darkconv float32 vs float64: {own:.2e})"
