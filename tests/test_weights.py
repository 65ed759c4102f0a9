"""The .weights reader and writer (load_weights_upto / save_weights_upto in Darknet's src/parser.c)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import darkconv
from darkconv.darknet import weights as weights_mod
from darkconv.darknet.weights import WeightsReader, WeightsWriter
from darkconv.io import atomic_write
from darkconv.errors import DarkconvError, WeightsError

# one layer of every kind that has parameters, with both BN and plain convs
CFG = """[net]
width=16
height=16
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[convolutional]
filters=4
size=1
groups=2
activation=linear

[shortcut]
from=-2
weights_type=per_channel
weights_normalization=softmax

[batchnorm]

[maxpool]
size=2
stride=2

[connected]
output=12
batch_normalize=1
activation=leaky

[convolutional]
filters=6
size=1
activation=linear

[yolo]
mask=0
anchors=10,14
classes=1
num=1
"""
# floats per layer in file order: conv-bn 4*4 + 4*3*9, conv 4 + 4*2, shortcut 2*4, batchnorm 4*4,
# connected 12 + 12*(4*8*8) + 3*12, head 6 + 6*12
LAYER_FLOATS = [16 + 108, 4 + 8, 8, 16, 0, 12 + 12 * 256 + 36, 6 + 72, 0]
TOTAL = sum(LAYER_FLOATS)


@pytest.fixture
def cfg_path(tmp_path):
    p = tmp_path / "net.cfg"
    p.write_text(CFG)
    return p


def random_model(cfg_path, seed=0):
    m = darkconv.load(cfg_path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, name, t in m.darknet_tensors():
            t.copy_(torch.rand(t.shape, generator=g) + (0.5 if name == "rolling_variance" else -0.5))
    return m


def tensors(m):
    return [t.detach().clone() for *_, t in m.darknet_tensors()]


def header(major, minor, revision=7, seen=123456):
    h = np.array([major, minor, revision], "<i4").tobytes()
    return h + np.array([seen], "<u8" if major * 10 + minor >= 2 else "<u4").tobytes()


def file_floats(m, transpose_connected=False) -> np.ndarray:
    """The model's parameters flattened in .weights order, written independently of WeightsWriter."""
    parts = []
    for _, s, name, t in m.darknet_tensors():
        a = t.detach().numpy().astype("<f4")
        if transpose_connected and s.type == "connected" and name == "weights":
            a = a.T  # stored as inputs x outputs
        parts.append(a.ravel())
    return np.concatenate(parts)


def test_float_count_matches_darknet_layout(cfg_path):
    m = darkconv.load(cfg_path)
    assert m.count_floats() == TOTAL
    per_layer = [0] * len(m.sections)
    for i, _, _, t in m.darknet_tensors():
        per_layer[i] += t.numel()
    assert per_layer == LAYER_FLOATS


def test_round_trip(cfg_path, tmp_path):
    m = random_model(cfg_path)
    path = tmp_path / "a.weights"
    m.save_weights(path)
    raw = path.read_bytes()
    assert len(raw) == 20 + 4 * TOTAL
    assert np.frombuffer(raw[:12], "<i4").tolist() == [0, 2, 0]  # major, minor, revision
    np.testing.assert_array_equal(np.frombuffer(raw[20:], "<f4"), file_floats(m))
    m2 = darkconv.load(cfg_path, path)
    for a, b in zip(tensors(m), tensors(m2)):
        assert torch.equal(a, b)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        for a, b in zip(m(x), m2(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("major,minor,header_bytes", [(0, 1, 16), (0, 0, 16), (0, 2, 20), (1, 0, 20), (0, 5, 20)])
def test_both_header_versions(cfg_path, tmp_path, major, minor, header_bytes):
    """seen is a uint32 when major*10+minor < 2, else a uint64."""
    m = random_model(cfg_path, 1)
    path = tmp_path / "v.weights"
    path.write_bytes(header(major, minor, 7, 4242) + file_floats(m).tobytes())
    r = WeightsReader(path)
    assert (r.header.major, r.header.minor, r.header.revision, r.header.seen) == (major, minor, 7, 4242)
    assert r.header.size == header_bytes and r.remaining == TOTAL
    m2 = darkconv.load(cfg_path, path)
    for a, b in zip(tensors(m), tensors(m2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("major,minor", [(1001, 0), (0, 1001)])
def test_connected_weights_transposed_flag(cfg_path, tmp_path, major, minor):
    """major > 1000 or minor > 1000: [connected] weights are stored inputs x outputs (conv weights are not)."""
    m = random_model(cfg_path, 2)
    path = tmp_path / "t.weights"
    path.write_bytes(header(major, minor) + file_floats(m, transpose_connected=True).tobytes())
    m2 = darkconv.load(cfg_path, path)
    for a, b in zip(tensors(m), tensors(m2)):
        assert torch.equal(a, b)
    # the same bytes under a normal header give a different (wrong) connected matrix
    path.write_bytes(header(0, 2) + file_floats(m, transpose_connected=True).tobytes())
    m3 = darkconv.load(cfg_path, path)
    fc = [i for i, s in enumerate(m.sections) if s.type == "connected"][0]
    assert not torch.equal(m3.layers[fc].fc.weight, m.layers[fc].fc.weight)


@pytest.mark.parametrize("missing,layer,section,what,needs,left", [
    (1, 6, "convolutional", "weights", 72, 71),          # last float of the head conv
    (72, 6, "convolutional", "weights", 72, 0),          # all of the head conv's weights
    (73, 6, "convolutional", "biases", 6, 5),
    (78 + 1, 5, "connected", "rolling_variance", 12, 11),
    (78 + 36 + 12 * 256 + 1, 5, "connected", "biases", 12, 11),
    (TOTAL - 16 - 108 - 12 - 3, 2, "shortcut", "weights", 8, 3),
])
def test_short_file_names_the_layer(cfg_path, tmp_path, missing, layer, section, what, needs, left):
    m = random_model(cfg_path)
    path = tmp_path / "short.weights"
    path.write_bytes(header(0, 2) + file_floats(m)[:TOTAL - missing].tobytes())
    with pytest.raises(WeightsError) as e:
        darkconv.load(cfg_path, path)
    msg = str(e.value)
    assert (e.value.layer, e.value.section, e.value.file) == (layer, section, str(path))
    assert f"layer {layer} [{section}]: needs {needs} more floats ({what}), only {left} left in the file" in msg
    assert "different cfg" in msg


def test_trailing_floats_are_counted(cfg_path, tmp_path):
    m = random_model(cfg_path)
    path = tmp_path / "long.weights"
    path.write_bytes(header(0, 2) + file_floats(m).tobytes() + np.zeros(5, "<f4").tobytes())
    with pytest.raises(WeightsError, match=r"5 floats \(20 bytes\) left over after the last layer"):
        darkconv.load(cfg_path, path)


def test_trailing_partial_float(cfg_path, tmp_path):
    m = random_model(cfg_path)
    path = tmp_path / "odd.weights"
    path.write_bytes(header(0, 2) + file_floats(m).tobytes() + b"\x00\x01")
    with pytest.raises(WeightsError, match=r"not a whole number of float32"):
        darkconv.load(cfg_path, path)


@pytest.mark.parametrize("content,pattern", [
    (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n" * 20, "HTML page"),
    (b"\n  <html lang='en'>" + b"x" * 100, "HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4a0b\nsize 248007048\n", "Git LFS pointer"),
    (b"[net]\nbatch=1\nwidth=416\n", r"\.cfg, not a \.weights"),
    (b"", "0 bytes: too short"),
    (b"\x00\x00\x00\x00\x02\x00", "too short"),
    (np.array([0, 2, 0], "<i4").tobytes() + b"\x00" * 6, "ends inside the header"),
])
def test_not_a_weights_file(cfg_path, tmp_path, content, pattern):
    path = tmp_path / "bad.weights"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=pattern):
        darkconv.load(cfg_path, path)


def test_cfg_passed_as_weights(cfg_path):
    with pytest.raises(WeightsError, match=r"this is a \.cfg"):
        darkconv.load(cfg_path, cfg_path)


def test_missing_file(cfg_path, tmp_path):
    with pytest.raises(WeightsError, match="cannot read weights"):
        darkconv.load(cfg_path, tmp_path / "nope.weights")


# -- atomic writes ------------------------------------------------------------------------------
def leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name not in ("net.cfg",))


def test_save_failure_leaves_no_file(cfg_path, tmp_path, monkeypatch):
    m = random_model(cfg_path)
    out = tmp_path / "out"
    out.mkdir()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(weights_mod.os, "replace", boom)
    with pytest.raises(DarkconvError, match="cannot write: No space left"):
        m.save_weights(out / "m.weights")
    assert leftovers(out) == []  # neither the target nor a temp file


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.weights"
    target.write_bytes(b"old contents")

    with pytest.raises(TypeError):  # the second chunk is not bytes: the write loop fails half-way
        atomic_write(target, [b"new header", object()])
    assert target.read_bytes() == b"old contents"
    assert leftovers(tmp_path) == ["m.weights"]


def test_failed_load_then_save_elsewhere(cfg_path, tmp_path):
    """A load that fails (short file) raises before anything is written; saving then works atomically."""
    m = random_model(cfg_path)
    short = tmp_path / "short.weights"
    short.write_bytes(header(0, 2) + file_floats(m)[:10].tobytes())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(WeightsError):
        darkconv.load(cfg_path, short).save_weights(out / "never.weights")
    assert leftovers(out) == []
    m.save_weights(out / "m.weights")
    assert leftovers(out) == ["m.weights"]
    assert (out / "m.weights").stat().st_size == 20 + 4 * TOTAL


def test_writer_header_versions(tmp_path):
    w = WeightsWriter(0, 1, 3, 99)
    w.add(np.arange(3, dtype=np.float32))
    w.write(tmp_path / "o.weights")
    raw = (tmp_path / "o.weights").read_bytes()
    assert len(raw) == 16 + 12 and np.frombuffer(raw[12:16], "<u4")[0] == 99
    r = WeightsReader(tmp_path / "o.weights")
    assert r.take(3, 0, "convolutional").tolist() == [0, 1, 2]
    r.finish()
    assert os.listdir(tmp_path) == ["o.weights"]
