"""darkconv.preprocess against loop transcriptions of Darknet's src/image.c.

The reference functions below follow the C code statement by statement
(``resize_image``, ``letterbox_image``, ``embed_image``, ``load_image_cv``/``mat_to_image``)
with numpy float32 scalars, so float32 rounding happens where the C code rounds.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import compiled_kernel
from darkconv import preprocess as pp
from darkconv.errors import ImageError

F = np.float32


# ----------------------------------------------------------------------------- references
def ref_resize_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """``resize_image`` on a (C, H, W) float32 image: plain per-pixel loops."""
    c_n, im_h, im_w = im.shape
    if im_w == w and im_h == h:
        return im.copy()
    resized = np.zeros((c_n, h, w), F)
    part = np.zeros((c_n, im_h, w), F)
    w_scale = F(im_w - 1) / F(w - 1)
    h_scale = F(im_h - 1) / F(h - 1)
    for k in range(c_n):
        for r in range(im_h):
            for c in range(w):
                if c == w - 1 or im_w == 1:
                    val = im[k, r, im_w - 1]
                else:
                    sx = F(c) * w_scale
                    ix = int(sx)
                    dx = sx - F(ix)
                    val = (F(1) - dx) * im[k, r, ix] + dx * im[k, r, ix + 1]
                part[k, r, c] = val
    for k in range(c_n):
        for r in range(h):
            sy = F(r) * h_scale
            iy = int(sy)
            dy = sy - F(iy)
            for c in range(w):
                resized[k, r, c] = (F(1) - dy) * part[k, iy, c]
            if r == h - 1 or im_h == 1:
                continue
            for c in range(w):
                resized[k, r, c] += dy * part[k, iy + 1, c]
    return resized


def ref_resize_image_by_column(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """Same statements as :func:`ref_resize_image`, looping over columns / rows only
    (each statement applied to a whole row/column vector, float32 element-wise) -
    fast enough for network-sized images."""
    c_n, im_h, im_w = im.shape
    part = np.zeros((c_n, im_h, w), F)
    resized = np.zeros((c_n, h, w), F)
    w_scale = F(im_w - 1) / F(w - 1)
    h_scale = F(im_h - 1) / F(h - 1)
    for c in range(w):
        if c == w - 1 or im_w == 1:
            part[:, :, c] = im[:, :, im_w - 1]
        else:
            sx = F(c) * w_scale
            ix = int(sx)
            dx = sx - F(ix)
            part[:, :, c] = (F(1) - dx) * im[:, :, ix] + dx * im[:, :, ix + 1]
    for r in range(h):
        sy = F(r) * h_scale
        iy = int(sy)
        dy = sy - F(iy)
        resized[:, r, :] = (F(1) - dy) * part[:, iy, :]
        if r == h - 1 or im_h == 1:
            continue
        resized[:, r, :] += dy * part[:, iy + 1, :]
    return resized


def ref_letterbox_image(im: np.ndarray, w: int, h: int, resize=ref_resize_image) -> np.ndarray:
    c_n, im_h, im_w = im.shape
    new_w, new_h = im_w, im_h
    if (F(w) / F(im_w)) < (F(h) / F(im_h)):
        new_w = w
        new_h = (im_h * w) // im_w
    else:
        new_h = h
        new_w = (im_w * h) // im_h
    resized = resize(im, new_w, new_h)
    boxed = np.zeros((c_n, h, w), F)
    boxed[...] = F(0.5)
    dx, dy = (w - new_w) // 2, (h - new_h) // 2
    for k in range(c_n):
        for y in range(new_h):
            for x in range(new_w):
                if 0 <= dx + x < w and 0 <= dy + y < h:
                    boxed[k, dy + y, dx + x] = resized[k, y, x]
    return boxed


def ref_mat_to_image(rgb_u8: np.ndarray) -> np.ndarray:
    h, w, c = rgb_u8.shape
    im = np.zeros((c, h, w), F)
    for y in range(h):
        for k in range(c):
            for x in range(w):
                im[k, y, x] = F(int(rgb_u8[y, x, k])) / F(255.0)
    return im


def rand_image(rng, c, h, w):
    return rng.random((c, h, w), dtype=np.float64).astype(F)


# ----------------------------------------------------------------------------- resize
@pytest.mark.parametrize("src,dst", [
    ((7, 5), (13, 11)),     # upsample, odd sizes (w, h)
    ((13, 11), (7, 5)),     # downsample
    ((5, 7), (3, 2)),
    ((1, 6), (4, 3)),       # single input column
    ((6, 1), (4, 3)),       # single input row
    ((9, 8), (9, 8)),       # same size: copy
    ((8, 9), (5, 9)),       # only the width changes
    ((4, 16), (6, 41)),     # 15 * h_scale < 15: Darknet's near-black last row
])
def test_resize_matches_loop_transcription(src, dst):
    rng = np.random.default_rng(sum(src) * 31 + sum(dst))
    im = rand_image(rng, 3, src[1], src[0])
    got = pp.resize(im, *dst, layout="chw")
    ref = ref_resize_image(im, *dst)
    assert got.dtype == np.float32 and got.shape == (3, dst[1], dst[0])
    np.testing.assert_array_equal(got, ref)           # bit for bit


def test_resize_network_size_matches_transcription():
    """352x448 -> 416x416 and 448x352 -> 416x416 (odd scales both ways)."""
    rng = np.random.default_rng(7)
    for iw, ih in ((352, 448), (448, 352)):
        im = rand_image(rng, 3, ih, iw)
        got = pp.resize(im, 416, 416, layout="chw")
        np.testing.assert_array_equal(got, ref_resize_image_by_column(im, 416, 416))
    # the column-wise reference is itself the per-pixel transcription
    small = rand_image(rng, 2, 9, 12)
    np.testing.assert_array_equal(ref_resize_image_by_column(small, 17, 6), ref_resize_image(small, 17, 6))


def test_resize_reproduces_darknet_last_row_quirk():
    """For 16 -> 416 rows, 415*h_scale rounds below 15 in float32: Darknet's last row is
    (1-dy)*part[14] with dy ~ 1, i.e. almost black. A textbook bilinear would copy row 15."""
    im = np.ones((3, 16, 20), F)
    out = pp.resize(im, 416, 416, layout="chw")
    assert out[:, -1, :].max() < 1e-5
    assert np.all(out[:, :-1, :] > 0.99)
    np.testing.assert_array_equal(out[:1, -3:, :], ref_resize_image_by_column(im[:1], 416, 416)[:, -3:, :])


def test_resize_layouts_agree():
    rng = np.random.default_rng(3)
    chw = rand_image(rng, 3, 10, 14)
    hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
    a = pp.resize(chw, 9, 6)
    b = pp.resize(hwc, 9, 6)
    assert b.shape == (6, 9, 3)
    np.testing.assert_array_equal(a, b.transpose(2, 0, 1))
    np.testing.assert_array_equal(pp.resize(chw[0], 9, 6), a[0])     # H x W
    with pytest.raises(ValueError, match="CHW or HWC"):
        pp.resize(np.zeros((3, 4, 3), F), 5, 5)


# ----------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("img,net", [
    ((23, 17), (32, 32)), ((17, 23), (32, 32)), ((40, 10), (16, 24)),
    ((10, 40), (24, 16)), ((21, 21), (13, 11)), ((64, 48), (32, 32)), ((33, 7), (13, 13)),
])
def test_letterbox_matches_transcription(img, net):
    rng = np.random.default_rng(img[0] * 100 + img[1])
    im = rand_image(rng, 3, img[1], img[0])
    got = pp.letterbox(im, *net, layout="chw")
    np.testing.assert_array_equal(got, ref_letterbox_image(im, *net))


def test_letterbox_geometry():
    # 640x480 into 416x416: width-bound, new 416x312, offsets (0, 52)
    assert pp.letterbox_geometry(640, 480, 416, 416) == (416, 312, 0, 52)
    # 480x640: height-bound
    assert pp.letterbox_geometry(480, 640, 416, 416) == (312, 416, 52, 0)
    # integer truncation: 1000x333 -> new_h = 333*416/1000 = 138 (138.528), dy = 139
    assert pp.letterbox_geometry(1000, 333, 416, 416) == (416, 138, 0, 139)
    # odd remainder: (416 - 311) / 2 = 52 in C
    nw, nh, dx, dy = pp.letterbox_geometry(1000, 749, 416, 416)
    assert (nw, nh) == (416, 311) and dy == 52


def test_letterbox_canvas_and_content():
    im = np.ones((3, 48, 64), F) * F(0.25)                  # 64x48
    out = pp.letterbox(im, 32, 32, layout="chw")            # new 32x24, dy = 4
    assert np.all(out[:, :4, :] == F(0.5)) and np.all(out[:, 28:, :] == F(0.5))
    assert np.allclose(out[:, 4:28, :], 0.25)


# ----------------------------------------------------------------------------- preprocess
def test_preprocess_stretch_and_letterbox(u8_kernel):
    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    im = ref_mat_to_image(img)
    np.testing.assert_array_equal(pp.to_float(img), im)
    a = pp.preprocess(img, (32, 24), letterbox=False)
    b = pp.preprocess(img, (32, 24), letterbox=True)
    assert a.shape == b.shape == (3, 24, 32) and a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, ref_resize_image(im, 32, 24))
    np.testing.assert_array_equal(b, ref_letterbox_image(im, 32, 24))
    for x in (a, b):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert not np.array_equal(a, b)
    # channel 0 is R: a pure red image stays red (no BGR swap, no mean/std)
    red = np.zeros((5, 5, 3), np.uint8)
    red[..., 0] = 255
    r = pp.preprocess(red, (5, 5))
    assert np.all(r[0] == 1.0) and np.all(r[1:] == 0.0)


def test_preprocess_batch(u8_kernel):
    rng = np.random.default_rng(5)
    imgs = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((20, 30, 3), (30, 20, 3))]
    batch = pp.preprocess_batch(imgs, (16, 16), letterbox=True)
    assert batch.shape == (2, 3, 16, 16)
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(batch[i], pp.preprocess(img, (16, 16), letterbox=True))
    with pytest.raises(ValueError):
        pp.preprocess(np.zeros((4, 4, 3), np.float32), (8, 8))


@pytest.fixture(params=["c", "numpy"])
def u8_kernel(request, monkeypatch):
    """Run a test through each uint8 kernel: the compiled ``darkconv._cresize`` and the NumPy one."""
    if request.param == "numpy":
        monkeypatch.setattr(pp, "_C", None)
    else:
        monkeypatch.setattr(pp, "_C", compiled_kernel("_cresize"))
    assert pp.kernel() == request.param
    return request.param


def ref_to_float(rgb_u8: np.ndarray) -> np.ndarray:
    """``mat_to_image`` vectorised (the same float32 division as :func:`ref_mat_to_image`)."""
    return rgb_u8.transpose(2, 0, 1).astype(F) / F(255.0)


@pytest.mark.parametrize("seed", range(12))
def test_preprocess_u8_fast_path_random_sizes(seed, u8_kernel):
    """The uint8 fast path (table lookup, gathered columns/rows, scratch buffers) against the transcription,
    stretch and letterbox, on random sizes: up, down, one pixel wide/high, equal in one axis."""
    rng = np.random.default_rng(100 + seed)
    iw, ih = (int(v) for v in rng.integers(1, 90, 2))
    w, h = (int(v) for v in rng.integers(1, 70, 2))
    if seed == 0:
        iw, w = 31, 31                      # equal widths
    if seed == 1:
        ih, h = 17, 17                      # equal heights
    if seed == 2:
        iw, ih = 1, 1
    img = rng.integers(0, 256, size=(ih, iw, 3), dtype=np.uint8)
    im = ref_to_float(img)
    # the per-pixel transcription divides by (w-1), (h-1): undefined in C for 1-pixel outputs
    w, h = max(w, 2), max(h, 2)
    np.testing.assert_array_equal(pp.preprocess(img, (w, h)), ref_resize_image_by_column(im, w, h))
    np.testing.assert_array_equal(pp.preprocess(img, (w, h), letterbox=True),
                                  ref_letterbox_image(im, w, h, resize=ref_resize_image_by_column))
    # scratch reuse: a second, different image through the same buffers gives its own result
    img2 = rng.integers(0, 256, size=(ih, iw, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pp.preprocess(img2, (w, h)), ref_resize_image_by_column(ref_to_float(img2), w, h))


@pytest.mark.parametrize("src", [(768, 576), (640, 424), (500, 500), (300, 900), (1000, 333), (416, 416),
                                 (416, 300), (200, 416)])
def test_preprocess_u8_network_sizes(src, u8_kernel):
    """Photo sizes -> 416x416, stretch and letterbox (embedded into a strided canvas view), bit for bit."""
    rng = np.random.default_rng(src[0] + 7 * src[1])
    img = rng.integers(0, 256, size=(src[1], src[0], 3), dtype=np.uint8)
    im = ref_to_float(img)
    np.testing.assert_array_equal(pp.preprocess(img, (416, 416)), ref_resize_image_by_column(im, 416, 416))
    np.testing.assert_array_equal(pp.preprocess(img, (416, 416), letterbox=True),
                                  ref_letterbox_image(im, 416, 416, resize=ref_resize_image_by_column))
    out = np.full((2, 3, 416, 416), np.nan, F)             # into one slot of a batch: every value written
    pp.preprocess_into(img, (416, 416), True, out[1])
    np.testing.assert_array_equal(out[1], pp.preprocess(img, (416, 416), letterbox=True))
    assert np.isnan(out[0]).all()


def test_preprocess_u8_extreme_scales_and_views(u8_kernel):
    """Tiny to large and back (rows read many times / skipped), Darknet's near-black last row, and
    non-contiguous inputs (a mirrored view, one channel of a 4-channel array): bit for bit."""
    rng = np.random.default_rng(99)
    for (iw, ih), (w, h) in [((3, 2), (416, 416)), ((20, 16), (416, 416)), ((1200, 900), (64, 48)),
                             ((2000, 37), (416, 416)), ((37, 2000), (416, 416)), ((2, 5), (9, 3))]:
        img = rng.integers(0, 256, size=(ih, iw, 3), dtype=np.uint8)
        np.testing.assert_array_equal(pp.preprocess(img, (w, h)), ref_resize_image_by_column(ref_to_float(img), w, h))
    ones = np.full((16, 20, 3), 255, np.uint8)              # 16 -> 416 rows: the last row is (1-dy)*part[14]
    out = pp.preprocess(ones, (416, 416))
    assert out[:, -1, :].max() < 1e-5 and np.all(out[:, :-1, :] > 0.99)
    img = rng.integers(0, 256, size=(61, 83, 4), dtype=np.uint8)
    for view in (img[:, ::-1, :3], img[::-1, :, 1:]):
        assert not view.flags.c_contiguous
        np.testing.assert_array_equal(pp.preprocess(view, (50, 40), letterbox=True),
                                      ref_letterbox_image(ref_to_float(np.ascontiguousarray(view)), 50, 40,
                                                          resize=ref_resize_image_by_column))


def test_c_kernel_checks_its_arguments():
    """The compiled kernel refuses buffers that do not match the sizes it is given (never writes out of bounds)."""
    c = compiled_kernel("_cresize")
    src = np.zeros((4, 5, 3), np.uint8)
    dst = np.zeros((3, 8, 8), F)
    with pytest.raises(ValueError, match="src must hold"):
        c.resize_u8(src, 5, 5, dst, 8, 8, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="dst must hold"):
        c.resize_u8(src, 4, 5, dst, 8, 9, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="fit inside"):
        c.resize_u8(src, 4, 5, dst, 8, 8, 6, 6, 3, 0)
    with pytest.raises(ValueError, match="positive"):
        c.resize_u8(src, 4, 5, dst, 8, 8, 0, 6, 0, 0)
    with pytest.raises((ValueError, TypeError, BufferError)):
        c.resize_u8(src, 4, 5, dst.astype(np.float64)[:, :, ::2], 8, 8, 8, 8, 0, 0)
    big = 2 ** 62                                           # products that would overflow into a passing check
    with pytest.raises(ValueError, match="src must hold"):
        c.resize_u8(src, big, big, dst, 8, 8, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="dst must hold"):
        c.resize_u8(src, 4, 5, dst, big, big, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="fit inside"):
        c.resize_u8(src, 4, 5, dst, 8, 8, 8, 8, 2 ** 63 - 4, 0)


# ----------------------------------------------------------------------------- loading
def test_load_image_rgb(tmp_path):
    import cv2

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    assert cv2.imwrite(str(path), rgb[:, :, ::-1].copy())
    got = pp.load_image(path)
    assert got.dtype == np.uint8 and got.shape == (9, 13, 3)
    np.testing.assert_array_equal(got, rgb)
    grey = tmp_path / "g.png"
    assert cv2.imwrite(str(grey), rgb[:, :, 0].copy())
    g = pp.load_image(grey)
    assert g.shape == (9, 13, 3) and np.all(g[..., 0] == g[..., 2])



def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an APP1 Exif segment holding only the Orientation tag (0x0112)."""
    import struct

    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


@pytest.mark.parametrize("kind", ["jpeg-1", "jpeg-3", "jpeg-6", "jpeg-8", "png-grey", "png-alpha", "png-16bit",
                                  "bmp"])
def test_load_image_equals_darknets_opencv_loader(tmp_path, kind):
    """The same pixels as Darknet's loader (``cv::imread(path, IMREAD_COLOR)``, then BGR -> RGB) whichever way
    darkconv decodes (OpenCV >= 4.10 writes RGB directly): EXIF orientation applied, grey expanded, alpha
    dropped, 16 bits scaled down."""
    import cv2

    rng = np.random.default_rng(len(kind))
    im = cv2.GaussianBlur(rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8), (5, 5), 0)
    path = tmp_path / ("x.jpg" if kind.startswith("jpeg") else f"x.{kind.split('-')[0]}")
    if kind.startswith("jpeg"):
        ok, enc = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 85])
        path.write_bytes(_with_exif_orientation(enc.tobytes(), int(kind[-1])))
    elif kind == "png-grey":
        cv2.imwrite(str(path), im[:, :, 0])
    elif kind == "png-alpha":
        cv2.imwrite(str(path), np.dstack([im, im[:, :, :1]]))
    elif kind == "png-16bit":
        cv2.imwrite(str(path), im.astype(np.uint16) * 257 + 3)
    else:
        cv2.imwrite(str(path), im)
    darknet = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    got = pp.load_image(path)
    np.testing.assert_array_equal(got, darknet)
    if kind in ("jpeg-6", "jpeg-8"):
        assert got.shape == (53, 37, 3)                     # rotated by the orientation tag
    assert got.flags.c_contiguous and got.dtype == np.uint8

@pytest.mark.parametrize("content,reason", [
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "cannot decode"),   # JPEG magic, garbage body
    (b"not an image at all", "cannot decode"),
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", "Git LFS"),
])
def test_load_image_corrupt_raises_image_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as ei:
        pp.load_image(path)
    msg = str(ei.value)
    assert str(path) in msg and reason in msg and "\n" not in msg


def test_load_image_missing(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        pp.load_image(tmp_path / "nope.jpg")


def test_package_level_preprocess_is_callable_and_a_module():
    import darkconv

    rng = np.random.default_rng(3)
    im = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = darkconv.preprocess(im, (64, 48), True)
    assert out.shape == (3, 48, 64) and out.dtype == np.float32
    assert np.array_equal(out, darkconv.preprocess.preprocess(im, (64, 48), letterbox=True))
    assert callable(darkconv.preprocess.load_image)
