"""darkconv against Darknet's own C functions, compiled from a Darknet source checkout at test time.

Set ``DARKNET_SRC`` to an AlexeyAB/darknet checkout (a work tree, or a bare git directory: its HEAD is
read) and have ``gcc`` on PATH; without them these tests skip, saying so. Nothing of Darknet is
shipped here: ``src/box.c`` (``do_nms_sort``, ``diounms_sort``, ``box_iou``/``box_diou``, with the C
library's ``qsort``) is compiled as is (and compared with both of darkconv's NMS kernels), ``forward_maxpool_layer_avx`` is cut from ``src/gemm.c``
(its AVX definition, the first one) and compiled with ``-mavx``. Both at ``-O2`` and at Darknet's
own ``-Ofast``.
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compiled_kernel
from test_postprocess import random_heads, tie_heads, yolo_spec

from darkconv.graph.layers import MaxPool
from darkconv.postprocess import darknet_rank, decode, nms_keep

SRC = os.environ.get("DARKNET_SRC")
pytestmark = pytest.mark.skipif(not SRC or shutil.which("gcc") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs a Darknet source checkout in DARKNET_SRC, gcc and an x86-64 CPU")
OPTS = ("-O2", "-Ofast")


def _read(rel: str) -> str:
    root = Path(SRC)
    if (root / rel).is_file():
        return (root / rel).read_text()
    return subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:{rel}"], check=True,
                          capture_output=True, text=True).stdout


def _headers() -> list[str]:
    root = Path(SRC)
    if (root / "src").is_dir():
        return [str(p.relative_to(root)) for d in ("src", "include") for p in (root / d).glob("*.h")]
    out = subprocess.run(["git", "--git-dir", str(root), "ls-tree", "--name-only", "HEAD", "src/", "include/"],
                         check=True, capture_output=True, text=True).stdout.split()
    return [f for f in out if f.endswith(".h")]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    d = tmp_path_factory.mktemp("darknet_c")
    for rel in ["src/box.c", *_headers()]:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(_read(rel))
    (d / "stub.c").write_text("#include <stdlib.h>\nvoid *xcalloc_location(size_t n, size_t s, const char *const f,"
                              " const char *const fn, const int l) { return calloc(n, s); }\n")
    gemm = _read("src/gemm.c")
    start = gemm.index("void forward_maxpool_layer_avx(")              # the AVX definition comes first
    end = re.compile(r"^}", re.M).search(gemm, start).end()
    (d / "avx_pool.c").write_text("#include <immintrin.h>\n#include <float.h>\n"
                                  "static int is_avx(void) { return 1; }\n" + gemm[start:end] + "\n")
    libs = {}
    for opt in OPTS:
        box = d / f"box{opt}.so"
        subprocess.run(["gcc", opt, "-fPIC", "-shared", str(d / "src/box.c"), str(d / "stub.c"), f"-I{d / 'include'}",
                        f"-I{d / 'src'}", "-lm", "-o", str(box)], check=True, capture_output=True)
        pool = d / f"pool{opt}.so"
        subprocess.run(["gcc", opt, "-mavx", "-mavx2", "-ffp-contract=fast", "-fPIC", "-shared", str(d / "avx_pool.c"),
                        "-o", str(pool)], check=True, capture_output=True)
        libs[opt] = (ctypes.CDLL(str(box)), ctypes.CDLL(str(pool)))
    return libs


class Box(ctypes.Structure):
    _fields_ = [("x", ctypes.c_float), ("y", ctypes.c_float), ("w", ctypes.c_float), ("h", ctypes.c_float)]


FP = ctypes.POINTER(ctypes.c_float)


class Det(ctypes.Structure):                                  # darknet.h: struct detection
    _fields_ = [("bbox", Box), ("classes", ctypes.c_int), ("best_class_idx", ctypes.c_int), ("prob", FP),
                ("mask", FP), ("objectness", ctypes.c_float), ("sort_class", ctypes.c_int), ("uc", FP),
                ("points", ctypes.c_int), ("embeddings", FP), ("embedding_size", ctypes.c_int),
                ("sim", ctypes.c_float), ("track_id", ctypes.c_int)]


def c_nms(lib, boxes, obj, probs, kind, thresh, beta):
    """Darknet's NMS on the decoded candidates; returns the surviving (candidate, class) pairs in the
    order of its array afterwards (track_id carries the candidate index through the sorts)."""
    n, classes = probs.shape
    dets = (Det * n)()
    keep = []
    for i in range(n):
        p = (ctypes.c_float * classes)(*probs[i].tolist())
        keep.append(p)
        dets[i].bbox = Box(*boxes[i].tolist())
        dets[i].classes, dets[i].prob, dets[i].objectness, dets[i].track_id = classes, ctypes.cast(p, FP), float(obj[i]), i
    if kind == "default":
        lib.do_nms_sort.argtypes = [ctypes.POINTER(Det), ctypes.c_int, ctypes.c_int, ctypes.c_float]
        lib.do_nms_sort(dets, n, classes, thresh)
    else:                                                     # NMS_KIND: DEFAULT, GREEDY, DIOU, CORNERS
        lib.diounms_sort.argtypes = [ctypes.POINTER(Det), ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int,
                                     ctypes.c_float]
        lib.diounms_sort(dets, n, classes, thresh, {"greedynms": 1, "diounms": 2}[kind], beta)
    return [(dets[i].track_id, k) for i in range(n) for k in range(classes) if dets[i].prob[k] > 0]


def test_struct_layout_is_darknets():
    assert ctypes.sizeof(Det) == 88                           # > 32 bytes: glibc sorts it indirectly


@pytest.mark.parametrize("nms_kernel", ["compiled", "numpy"])
@pytest.mark.parametrize("opt", OPTS)
@pytest.mark.parametrize("kind", ["default", "greedynms", "diounms"])
def test_nms_equals_darknets_box_c(build, opt, kind, nms_kernel, monkeypatch):
    import darkconv.postprocess as pp

    if nms_kernel == "compiled":                              # every case through darkconv._cnms, however large
        monkeypatch.setattr(pp, "_C", compiled_kernel("_cnms"))
        monkeypatch.setattr(pp, "_C_NMS_MAX_WORK", 1 << 62)
    else:
        monkeypatch.setattr(pp, "_C", None)
    lib = build[opt][0]
    ties = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        for grids in (((4, 6), (8, 12)), ((13, 13), (26, 26))):
            spec = yolo_spec(classes=4 if grids[0][0] < 13 else 20, grids=grids, nms_kind=kind, beta=0.8)
            raws = tie_heads(spec, rng) if seed % 2 == 0 else random_heads(spec, rng, obj_bias=-0.5)
            boxes, obj, probs = decode(raws, spec, [(500, 375)])[0]
            ref = c_nms(lib, boxes, obj, probs, kind, 0.45, 0.8)
            bi, ci = nms_keep(boxes, probs, 0.45, kind, 0.8)
            mine = [(int(bi[i]), int(ci[i])) for i in np.argsort(darknet_rank(bi, ci, probs))]
            assert mine == ref, (seed, grids)
            p = probs[probs > 0]
            ties += p.size - np.unique(p).size
    assert ties > 1000                                        # the data is full of exact ties


@pytest.mark.parametrize("opt", OPTS)
def test_avx_maxpool_emulation_equals_darknets_gemm_c(build, opt):
    f = build[opt][1].forward_maxpool_layer_avx
    f.argtypes = [FP, FP, ctypes.c_void_p] + [ctypes.c_int] * 9
    rng = np.random.default_rng(0)
    differ = 0
    for size, stride, pad, h, w in [(5, 1, 4, 13, 13), (9, 1, 8, 13, 13), (5, 1, 4, 19, 19), (9, 1, 8, 19, 19),
                                    (13, 1, 12, 19, 19), (13, 1, 12, 40, 40), (5, 1, 4, 38, 30), (2, 1, 1, 13, 13),
                                    (2, 2, 1, 52, 52), (2, 2, 2, 52, 52), (3, 2, 2, 26, 26), (3, 1, 2, 20, 21)]:
        x = rng.normal(0, 1, (2, 4, h, w)).astype(np.float32)
        oh, ow = (h + pad - size) // stride + 1, (w + pad - size) // stride + 1
        out = np.zeros((2, 4, oh, ow), np.float32)
        f(x.ctypes.data_as(FP), out.ctypes.data_as(FP), None, size, w, h, ow, oh, 4, pad, stride, 2)
        m = MaxPool(size, (stride, stride), pad)
        plain = m(torch.from_numpy(x)).numpy()
        m.cpu_avx = True
        np.testing.assert_array_equal(m(torch.from_numpy(x)).numpy(), out)
        differ += not np.array_equal(plain, out)
    assert differ >= 6                                        # the AVX build really differs from the default
