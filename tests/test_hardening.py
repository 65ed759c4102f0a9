"""Issue #13's corpus: each defect of the fuzz/fault campaign, reproduced, as a one-line error (or warning).

Every case checks the message text (file:line, layer, key, the fix), a non-zero exit where the
CLI is involved, no traceback, and that no output or temp file is left behind.
"""
from __future__ import annotations

import os
import re
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import darkconv
from darkconv import io as dio
from darkconv.cli import main
from darkconv.darknet.cfg import parse_cfg
from darkconv.errors import CfgError, DarkconvError, ExportError, ImageError
from darkconv.graph.model import DarknetModel, build_model, free_schedule

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "cfg"
DATA = ROOT / "darkconv" / "data"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"
HEAD = "\n[convolutional]\nfilters=6\nsize=1\nactivation=linear\n\n[yolo]\nmask=0\nanchors=10,14\nclasses=1\nnum=1\n"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *needles, code=1) -> str:
    assert r.exit_code == code, (r.exit_code, r.output)
    err = r.stderr.strip()
    assert err.startswith("darkconv: error: ") and "\n" not in err, err
    assert "Traceback" not in r.output
    for n in needles:
        assert n in err, (n, err)
    return err


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def tiny(sub: tuple[str, str] | None = None, extra: str = "", name="yolov3-tiny") -> str:
    """The bundled cfg, with the first line matching ``sub[0]`` (a regex) replaced by ``sub[1]``."""
    text = (CFG / f"{name}.cfg").read_text()
    if sub:
        new, n = re.subn(sub[0], sub[1], text, count=1, flags=re.M)
        assert n == 1, sub
        text = new
    return text + extra


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


# -------------------------------------------------------------------- tracebacks -> one line
CFG_CASES = [
    # (id, cfg text, substrings of the one-line message, the line it must name)
    ("digits-6000", tiny((r"^filters=16$", "filters=" + "9" * 6000)),
     ["layer 0 [convolutional]: filters='9999", "(6,000 characters) is out of range: Darknet reads it as a 32-bit int"],
     "filters=999"),
    ("filters-1e9", tiny((r"^filters=16$", "filters=1000000000")),
     ["layer 0 [convolutional]: filters=1000000000 size=3 needs 124 GB of weights (31,000,000,000 floats): "
      "check filters= here, or set DARKCONV_MAX_WEIGHTS_GB (now 4 GB) to raise the limit"], "filters=1000000000"),
    ("filters-1e20", tiny((r"^filters=16$", "filters=100000000000000000000")),
     ["filters='100000000000000000000' is out of range"], "filters=1000"),
    ("size-huge-pad", tiny((r"^size=3$", "size=1177791689")),
     ["layer 0 [convolutional]: filters=16 size=1177791689 needs", "TB of weights", "check size= here"],
     "size=1177791689"),
    ("stride-1e28", tiny((r"^stride=1$", "stride=1" + "0" * 28)), ["layer 0 [convolutional]: stride=", "out of range"],
     "stride=100"),
    ("yolo-num-1e9-no-mask", tiny((r"^mask = 3,4,5\n(.*\n.*\n)num=6$", r"\1num=1000000000")),
     ["layer 16 [yolo]: anchors has 12 values, needs 2000000000 (num=1000000000 pairs)"], "anchors"),
    ("connected-output-neg", NET + "\n[connected]\noutput=-5\n" + HEAD,
     ["layer 0 [connected]: output=-5 must be at least 1"], "output=-5"),
    ("classes-neg-matching-filters", NET + "\n[convolutional]\nfilters=3\nsize=1\n\n[yolo]\nmask=0,1,2\n"
     "anchors=1,1,2,2,3,3\nclasses=-4\nnum=3\n", ["layer 1 [yolo]: classes=-4 must be at least 1"], "classes=-4"),
    ("softmax-temperature-0", NET + "\n[convolutional]\nfilters=6\nsize=1\n\n[softmax]\ntemperature=0\n"
     "\n[yolo]\nmask=0\nanchors=10,14\nclasses=1\nnum=1\n",
     ["layer 1 [softmax]: temperature=0 must be positive"], "temperature=0"),
    ("nul-after-4k", tiny(extra="\n" + "# padding comment line\n" * 200 + "[maxpool]\nsize=1\nstride=1\nfilters=1\x006\n"),
     ["the line contains a NUL byte (Darknet would silently cut the line there): remove it"], "\x00"),
    ("width-100000-yolov4", tiny((r"^width=608$", "width=100000"), name="yolov4"),
     ["layer 1 [convolutional]: size=3 filters=64 needs a 17.5 GB im2col workspace (Darknet's get_workspace_size32) "
      "for the 100000x608 network input at batch 1 (float32): check this layer, use a smaller width/height "
      "(or --size), or set DARKCONV_MAX_ACTIVATIONS_GB (now 16 GB) to raise the limit"], "filters=64"),
    ("width-height-100000", tiny((r"^width=416\nheight=416$", "width=100000\nheight=100000")),
     ["the 100000x100000x3 network input alone needs 120 GB at batch 1 (float32): use a smaller width/height "
      "(or --size), or set DARKCONV_MAX_ACTIVATIONS_GB"], "width=100000"),
    ("maxpool-padded-input", tiny((r"^size=2\nstride=2$", "size=100000\nstride=2\npadding=99999")),  # fuzz, seed 2
     ["layer 1 [maxpool]: size=100000 padding=99999 needs a 645 GB padded copy of its input for the 416x416 "
      "network input at batch 1 (float32): check this layer, use a smaller width/height (or --size), or set "
      "DARKCONV_MAX_ACTIVATIONS_GB"], "size=100000"),
    ("upsample-1e6", NET + "\n[upsample]\nstride=1000000\n" + HEAD,
     ["layer 0 [upsample]: its output (3 x 32000000 x 32000000) needs 12,288 TB for the 32x32 network input at "
      "batch 1 (float32): check this layer, use a smaller width/height (or --size), or set "
      "DARKCONV_MAX_ACTIVATIONS_GB"], "[upsample]"),
]


@pytest.mark.parametrize("case, text, needles, line", CFG_CASES, ids=[c[0] for c in CFG_CASES])
def test_cfg_defects_are_one_line_errors(tmp_path, case, text, needles, line):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(text)
    t = time.perf_counter()
    r = invoke("convert", cfg, tmp_path / "none.weights", "-o", tmp_path / "out.onnx")
    err = one_line_error(r, *needles)
    assert time.perf_counter() - t < 30  # refused from the cfg alone: no allocation, no export
    assert err.startswith(f"darkconv: error: {cfg}:{line_of(text, line)}: "), err
    assert len(err) < 600
    assert listing(tmp_path) == ["bad.cfg"]


def test_memory_limits_are_overridable(tmp_path, monkeypatch):
    text = NET + "\n[convolutional]\nfilters=40000\nsize=3\npad=1\n\n[convolutional]\nfilters=32\nsize=3\npad=1\n" \
        + HEAD  # layer 1: 32*40000*9 weights, 46 MB
    monkeypatch.setenv("DARKCONV_MAX_WEIGHTS_GB", "0.01")
    with pytest.raises(CfgError, match=r"layer 1 \[convolutional\]: filters=32 size=3 needs 46.1 MB of weights .*"
                                       r"DARKCONV_MAX_WEIGHTS_GB \(now 10 MB\)"):
        build_model(tmp_path / "t.cfg", text=text, init=False)
    monkeypatch.setenv("DARKCONV_MAX_WEIGHTS_GB", "1")
    assert build_model(tmp_path / "t.cfg", text=text, init=False).memory.weights > 46e6
    monkeypatch.setenv("DARKCONV_MAX_ACTIVATIONS_GB", "abc")
    with pytest.raises(DarkconvError, match="DARKCONV_MAX_ACTIVATIONS_GB='abc' must be a positive number of GB"):
        build_model(tmp_path / "t.cfg", text=text, init=False)


def test_total_weights_over_the_limit_names_the_largest_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKCONV_MAX_WEIGHTS_GB", "0.03")  # yolov3-tiny: 35 MB in all, 19 MB at most in one layer
    with pytest.raises(CfgError, match=r"t\.cfg: the network needs 35.4 MB of weights in total \(largest: layer 12 "
                                       r"\[convolutional\], 18.9 MB\): set DARKCONV_MAX_WEIGHTS_GB"):
        build_model(tmp_path / "t.cfg", text=tiny(), init=False)
    monkeypatch.delenv("DARKCONV_MAX_WEIGHTS_GB")
    monkeypatch.setenv("DARKCONV_MAX_ACTIVATIONS_GB", "0.03")  # outputs 34 MB + im2col 25 MB; 11 MB at most per layer
    text = tiny()
    with pytest.raises(CfgError) as e:
        build_model(tmp_path / "t.cfg", text=text, init=False)
    assert str(e.value) == (f"{tmp_path / 't.cfg'}:{line_of(text, 'width=416')}: at the 416x416 network input the "
                            "layer outputs need 58.9 MB at batch 1 (float32; largest: layer 0 [convolutional] 16 x 416 "
                            "x 416, 11.1 MB): use a smaller width/height (or --size), or set "
                            "DARKCONV_MAX_ACTIVATIONS_GB (now 30 MB) to raise the limit")


def test_real_models_fit_the_default_limits():
    """The largest Darknet YOLO cfgs load (and the estimate equals the floats the .weights hold)."""
    for cfg in sorted(CFG.glob("*.cfg")) + [DATA / "yolov4-tiny-10.cfg"]:
        m = build_model(cfg, init=False)
        assert m.memory.weights == 4 * m.count_floats(), cfg
    shared = Path("/work/shared/darknet-data/cfg")
    for name in ("yolov4-p6", "yolov7", "yolov4x-mish"):
        if (shared / f"{name}.cfg").exists():
            m = build_model(shared / f"{name}.cfg", init=False)
            assert m.memory.weights == 4 * m.count_floats() and m.memory.activations < 16e9


def test_the_estimate_is_checked_before_allocation(tmp_path, monkeypatch):
    """No module is made (nothing allocated) for a cfg the estimate refuses."""
    from darkconv.graph import registry

    made = []
    real = registry.Built.make
    monkeypatch.setattr(registry.Built, "make", lambda self, init=True: made.append(1) or real(self, init))
    with pytest.raises(CfgError, match="needs"):
        build_model(tmp_path / "t.cfg", text=tiny((r"^filters=16$", "filters=1000000000")))
    assert made == []
    build_model(tmp_path / "t.cfg", text=tiny(), init=False)
    assert len(made) == 24


def test_load_without_init_equals_load_with_init(default_model):
    """darkconv.load(cfg, weights) builds without random init; every tensor is then filled from the file."""
    fast = darkconv.load(default_model.cfg, default_model.weights)
    slow = build_model(default_model.cfg, init=True).load_weights(default_model.weights)
    a, b = fast.state_dict(), slow.state_dict()
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


# -------------------------------------------------------------------------- unknown keys
def test_unknown_key_warns_with_file_line(tmp_path):
    text = tiny((r"^activation=leaky$", "activaton=leaky"))
    cfg = tmp_path / "typo.cfg"
    cfg.write_text(text)
    with pytest.warns(darkconv.darknet.keys.UnknownKeyWarning) as rec:
        darkconv.load(cfg)
    assert [str(w.message) for w in rec] == [
        f"{cfg}:{line_of(text, 'activaton')}: layer 0 [convolutional]: unknown key 'activaton' in [convolutional] "
        "(did you mean activation?): Darknet ignores it (\"Unused field\"), so it has no effect"]


def test_unknown_key_cli_warning_and_strict(tmp_path, default_model):
    text = Path(default_model.cfg).read_text().replace("activation=leaky", "activaton=leaky", 2)
    cfg = tmp_path / "typo.cfg"
    cfg.write_text(text)
    out = tmp_path / "o.onnx"
    r = invoke("convert", cfg, tmp_path / "none.weights", "-o", out, "--strict")
    one_line_error(r, f"{cfg}:{line_of(text, 'activaton')}: layer 0 [convolutional]: unknown key 'activaton'",
                   "with --strict this is an error: fix or remove it; 1 more unknown key in the cfg")
    assert not out.exists()
    r = invoke("convert", cfg, default_model.weights, "-o", out)
    assert r.exit_code == 0, r.output
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("darkconv: warning:")]
    assert len(warns) == 2 and all("unknown key 'activaton'" in w for w in warns)
    assert r.stderr.strip().splitlines() == warns  # one line per key, nothing else


@pytest.mark.parametrize("path", sorted(CFG.glob("*.cfg")) + [DATA / "yolov4-tiny-10.cfg"], ids=lambda p: p.name)
def test_bundled_cfgs_have_no_unknown_keys(path):
    from darkconv.darknet.keys import check_keys

    assert check_keys(parse_cfg(path), strict=True) == []


def test_keys_of_every_shared_cfg_are_known_but_two():
    """Of /work/shared/darknet-data's cfgs only one has keys Darknet does not read (uc_normalizer belongs to
    [Gaussian_yolo], beta1 to nothing): Darknet prints "Unused field" for the same ones."""
    from darkconv.darknet.keys import unknown_keys

    shared = Path("/work/shared/darknet-data/cfg")
    if not shared.is_dir():
        pytest.skip("/work/shared/darknet-data is not on this machine")
    found = {(p.name, k) for p in shared.glob("*.cfg") for s in [parse_cfg(p).net, *parse_cfg(p).layers]
             for k in unknown_keys(s)}
    assert found == {("yolov4-sam-mish-csp-reorg-bfm.cfg", "uc_normalizer"),
                     ("yolov4-sam-mish-csp-reorg-bfm.cfg", "beta1")}


def test_key_table_matches_darknet_parser():
    """Every key string the AlexeyAB parse_* functions read is in darkconv's table for that section."""
    src = Path("/work/.mirror/AlexeyAB+darknet/repo")
    if not src.exists():
        pytest.skip("the AlexeyAB/darknet mirror is not on this machine")
    parser = subprocess.run(["git", "-C", str(src), "show", "HEAD:src/parser.c"], capture_output=True,
                            text=True).stdout
    from darkconv.darknet.keys import IGNORED, USED

    funcs = {"convolutional": "parse_convolutional", "maxpool": "parse_maxpool", "yolo": "parse_yolo",
             "region": "parse_region", "route": "parse_route", "shortcut": "parse_shortcut",
             "upsample": "parse_upsample", "connected": "parse_connected", "softmax": "parse_softmax",
             "dropout": "parse_dropout", "local_avgpool": "parse_local_avgpool", "sam": "parse_sam",
             "scale_channels": "parse_scale_channels", "reorg": "parse_reorg_old", "reorg3d": "parse_reorg",
             "net": "parse_net_options"}
    for section, fn in funcs.items():
        body = parser[parser.index(f"{fn}(list *options"):]
        body = body[:body.index("\n}\n")]
        keys = {k.lower() for k in re.findall(r'option_find\w*\(options, "(\w+)"', body)}
        assert keys and keys <= USED[section] | IGNORED[section], (section, keys - USED[section] - IGNORED[section])


# -------------------------------------------------------------------------------- images
def png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_huge_image_refused_before_decoding(tmp_path, monkeypatch):
    import cv2

    big = tmp_path / "big.png"
    big.write_bytes(png_header(20000, 20000) + b"\x00" * 64)
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ImageError) as e:
        darkconv.preprocess.load_image(big)
    assert str(e.value) == (f"{big}: the image is 20000x20000 (400 megapixels), above darkconv's limit of 100 "
                            "megapixels; it was not decoded (set DARKCONV_MAX_IMAGE_PIXELS to raise the limit)")


def test_pixel_limit_is_configurable(monkeypatch):
    dog = DATA / "dog.jpg"  # 768x576
    monkeypatch.setenv("DARKCONV_MAX_IMAGE_PIXELS", "400000")
    with pytest.raises(ImageError, match=r"768x576 \(0 megapixels\), above darkconv's limit of 0 megapixels"):
        darkconv.preprocess.load_image(dog)
    monkeypatch.setenv("DARKCONV_MAX_IMAGE_PIXELS", str(768 * 576))
    assert darkconv.preprocess.load_image(dog).shape == (576, 768, 3)
    assert darkconv.preprocess.load_image(dog, max_pixels=768 * 576).shape == (576, 768, 3)


@pytest.mark.parametrize("fmt", [".jpg", ".png", ".bmp", ".tiff", ".webp", ".ppm"])
def test_header_sizes_match_opencv(tmp_path, fmt):
    import cv2

    from darkconv.imagesize import header_size

    img = np.random.RandomState(0).randint(0, 255, (37, 53, 3), np.uint8)
    ok, buf = cv2.imencode(fmt, img)
    assert ok
    assert header_size(buf.tobytes()) == (53, 37)


def corrupt_jpeg(path: Path) -> Path:
    """dog.jpg with 10 bytes inserted before its first restart marker: libjpeg decodes it but prints
    "Corrupt JPEG data: 10 extraneous bytes before marker 0xd1" on stderr (cv2.imread would too)."""
    data = (DATA / "dog.jpg").read_bytes()
    i = data.index(b"\xff\xd1")
    path.write_bytes(data[:i] + b"\x11" * 10 + data[i:])
    return path


def test_corrupt_jpeg_is_one_error_and_prints_nothing(tmp_path):
    """libjpeg's own stderr line is caught (fd level) and becomes the ImageError's reason."""
    bad = corrupt_jpeg(tmp_path / "bad.jpg")
    code = ("import sys; from darkconv.preprocess import load_image, load_images\n"
            "from darkconv.errors import ImageError\n"
            f"res = load_images([{str(DATA / 'dog.jpg')!r}, {str(bad)!r}, {str(DATA / 'eagle.jpg')!r}])\n"
            "print([type(r).__name__ for r in res]); print(res[1])\n"
            "sys.stderr.write('other stderr output stays\\n')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "['ndarray', 'ImageError', 'ndarray']"
    assert out[1] == (f"{bad}: corrupt image data (Corrupt JPEG data: 10 extraneous bytes before marker 0xd1): "
                      "re-encode or replace the file")
    assert r.stderr == "other stderr output stays\n"


def test_parallel_decodes_blame_the_right_image(tmp_path):
    """Decodes overlap in threads while fd 2 is shared: each corrupt image, and only it, gets its error."""
    from darkconv.preprocess import load_image, load_images

    data = (DATA / "dog.jpg").read_bytes()
    marks = [m.start() for m in re.finditer(b"\xff[\xd0-\xd7]", data)]
    files = []
    for k in range(16):
        f = tmp_path / f"{k}.jpg"
        i = marks[k % len(marks)]
        f.write_bytes(data if k % 3 else data[:i] + b"\x11" * (5 + k) + data[i:])
        files.append(f)

    def outcome(r):
        return r.bare if isinstance(r, ImageError) else r.shape

    serial = []
    for f in files:
        try:
            serial.append(load_image(f).shape)
        except ImageError as e:
            serial.append(e.bare)
    assert sum(isinstance(o, str) for o in serial) == 6
    for _ in range(3):
        assert [outcome(r) for r in load_images(files)] == serial


def test_detect_corrupt_jpeg_stderr_is_darkconv_lines_only(tmp_path, default_onnx):
    bad = corrupt_jpeg(tmp_path / "bad.jpg")
    r = subprocess.run([sys.executable, "-m", "darkconv", "detect", str(default_onnx), str(bad)],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == f"darkconv: error: 1 of 1 image(s) could not be read ({bad})\n", r.stderr
    assert f"{bad}: ERROR corrupt image data (Corrupt JPEG data:" in r.stdout


def test_image_list_not_utf8(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"a.jpg\nb\xff.jpg\n")
    r = invoke("detect", ROOT / "cfg" / "yolov3-tiny.cfg", "x.weights", lst)
    one_line_error(r, f"{lst}:2: the image list is not UTF-8 text (byte 0xff): save it as UTF-8, one path per line")


def test_image_list_unreadable(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\n")
    lst.chmod(0)
    try:
        if os.access(lst, os.R_OK):
            pytest.skip("running as root: file permissions do not stop reads here "
                        "(the message is checked below through a real unreadable path)")
        r = invoke("detect", ROOT / "cfg" / "yolov3-tiny.cfg", "x.weights", lst)
        one_line_error(r, f"{lst}: cannot read the image list: Permission denied")
    finally:
        lst.chmod(0o644)


def test_image_list_unreadable_as_root_too():
    """/proc/self/mem reads fail (EIO) even for root: the list is named, one line."""
    from darkconv.preprocess import _read_list

    with pytest.raises(ImageError, match=r"^/proc/self/mem: cannot read the image list: "):
        _read_list(Path("/proc/self/mem"))


# ------------------------------------------------------------------------------------ ONNX
def test_onnx_with_empty_spec_is_one_line(tmp_path, default_onnx):
    proto = onnx.load(str(default_onnx))
    for p in proto.metadata_props:
        if p.key == "darkconv.spec":
            p.value = "{}"
    bad = tmp_path / "empty-spec.onnx"
    onnx.save(proto, str(bad))
    r = invoke("detect", bad, DATA / "dog.jpg")
    one_line_error(r, f"{bad}: the darkconv.spec metadata is invalid (missing 'width'): re-export it with "
                      "`darkconv convert`")
    with pytest.raises(ExportError, match="head 0"):
        from darkconv.darknet.spec import spec_from_json
        spec_from_json('{"width": 416, "height": 416, "heads": [{"kind": "yolo", "layer": 1, "classes": -4, '
                       '"anchors": [[1, 2]], "grid": [13, 13]}]}')


# --------------------------------------------------------------------------------- outputs
@pytest.fixture
def model_files(default_model):
    return default_model.cfg, default_model.weights


def test_output_device_node_is_refused(model_files):
    cfg, weights = model_files
    before = os.stat("/dev/null")
    r = invoke("convert", cfg, weights, "-o", "/dev/null")
    one_line_error(r, "/dev/null: is a character device: darkconv writes only to a new path or over a regular "
                      "file (it would replace it, not write into it); give another output path")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


def test_output_fifo_symlink_socket_folder_refused(tmp_path, model_files):
    import socket

    cfg, weights = model_files
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    target = tmp_path / "target.onnx"
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    sock = tmp_path / "s.onnx"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    try:
        for path, what in [(fifo, "a named pipe (FIFO)"), (link, "a symbolic link"), (sock, "a socket")]:
            one_line_error(invoke("convert", cfg, weights, "-o", path), f"{path}: is {what}: darkconv writes only")
        with pytest.raises(DarkconvError, match="is a directory"):
            dio.atomic_write(tmp_path, [b"x"])
    finally:
        s.close()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link) and not target.exists()
    assert listing(tmp_path) == ["fifo.onnx", "link.onnx", "s.onnx"]


def test_convert_over_an_input_is_refused(tmp_path, model_files):
    cfg, weights = model_files
    r = invoke("convert", cfg, weights, "-o", weights)
    one_line_error(r, f"{weights}: is one of the inputs: writing it would destroy it")


def unwritable_folder(tmp_path) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):  # root: permissions do not apply; sysfs refuses new files even for root
        d.chmod(0o755)
        d = Path("/sys")
        try:
            os.close(os.open(d / "darkconv-probe", os.O_WRONLY | os.O_CREAT, 0o600))
        except PermissionError:
            return d
        pytest.skip("no folder on this machine refuses new files for this user")
    return d


def test_convert_checks_the_output_folder_before_loading(tmp_path, model_files, monkeypatch):
    cfg, weights = model_files
    ro = unwritable_folder(tmp_path)
    monkeypatch.setattr(darkconv, "load", lambda *a, **k: pytest.fail("loaded before checking the output"))
    t = time.perf_counter()
    r = invoke("convert", cfg, weights, "-o", ro / "m.onnx")
    one_line_error(r, f"{ro / 'm.onnx'}: cannot write in the folder {ro}: Permission denied")
    assert time.perf_counter() - t < 5


def test_prepare_output_dir_is_one_line(tmp_path):
    ro = unwritable_folder(tmp_path)
    with pytest.raises(DarkconvError, match=rf"^{ro / 'out'}: cannot create the output folder: "
                                            r"(Permission denied|Operation not permitted)$"):
        dio.prepare_output_dir(ro / "out")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DarkconvError, match="is a file, not a folder"):
        dio.prepare_output_dir(f)
    assert dio.prepare_output_dir(tmp_path / "a" / "b").is_dir()
    assert listing(tmp_path / "a" / "b") == []  # the write probe leaves nothing


def test_temp_names_and_stale_cleanup(tmp_path):
    out = tmp_path / "m.onnx"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = dio.temp_path(out).with_name(re.sub(r"-\d+-([0-9a-f]+)$", rf"-{dead.pid}-\1", dio.temp_path(out).name))
    live = dio.temp_path(out).with_name(re.sub(r"-\d+-([0-9a-f]+)$", rf"-{os.getppid()}-\1", dio.temp_path(out).name))
    foreign = tmp_path / ".m.onnx.darkconv-tmp-otherhost-1-abcd"
    for p in (stale, live, foreign):
        p.write_bytes(b"partial")
    assert stale.name.startswith(".m.onnx.darkconv-tmp-") and stale != live
    dio._CLEANED.discard(os.path.abspath(tmp_path))
    dio.atomic_write(out, [b"data"])
    assert out.read_bytes() == b"data"
    assert listing(tmp_path) == sorted(["m.onnx", live.name, foreign.name])  # the dead process's temp is gone


SLOW_WRITER = """
import sys, time
from darkconv.cli.common import handle_errors
from darkconv.io import atomic_write

def chunks():
    yield b"x" * 1000
    print("writing", flush=True)
    for _ in range(600):
        time.sleep(0.1)
        yield b"y"

@handle_errors
def job():
    atomic_write(sys.argv[1], chunks())

job()
"""


@pytest.mark.parametrize("sig, code, message", [
    (signal.SIGTERM, 143, "darkconv: error: terminated (SIGTERM); nothing half-written was left\n"),
    (signal.SIGINT, 130, "darkconv: error: interrupted\n")])
def test_signal_during_write_leaves_nothing(tmp_path, sig, code, message):
    out = tmp_path / "out.bin"
    p = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline() == "writing\n"
    assert any(".darkconv-tmp-" in n for n in os.listdir(tmp_path))  # the temp file is there, mid-write
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (code, message)
    assert listing(tmp_path) == []


@pytest.mark.slow
def test_sigterm_during_real_convert(tmp_path, model_files):
    """The real command, terminated while it exports: exit 143, one line, no output and no temp file."""
    cfg, weights = model_files
    p = subprocess.Popen([sys.executable, "-m", "darkconv", "convert", str(cfg), str(weights), "-o", "m.onnx"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    line = p.stdout.readline()
    assert line.startswith("loaded "), line
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:  # the export won the race: then the output is complete
        assert listing(tmp_path) == ["m.onnx"] and onnx.load(str(tmp_path / "m.onnx"))
        return
    assert (p.returncode, err) == (143, "darkconv: error: terminated (SIGTERM); nothing half-written was left\n")
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------- scaling
def test_free_schedule_drops_each_output_after_its_last_reader():
    #  0 <- input; 1 <- 0; 2 <- 1, 0 (route); 3 <- 2; head reads 3
    inputs = [(-1,), (0,), (1, 0), (2,)]
    assert free_schedule(inputs, keep=[3]) == [[], [], [0, 1], [2]]
    assert free_schedule([(-1,), (-1,), (1,)], keep=[2]) == [[0], [], [1]]  # output 0 is never read: at once


def test_forward_after_linear_schedule_is_unchanged(default_torch_model):
    import torch

    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    m = DarknetModel(parse_cfg(default_torch_model.cfg_path), 96, 96).eval()
    outs = {-1: x}
    for i, layer in enumerate(m.layers):  # keep every output: no schedule at all
        outs[i] = layer(*[outs[j] for j in m.inputs[i]])
    ref = [outs[h - 1] for h in m.head_layers]
    with torch.no_grad():
        got = m(x)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_onnx_over_protobuf_limit_is_refused_up_front(tmp_path):
    from darkconv.export.onnx import to_onnx_model

    text = NET + "\n[convolutional]\nfilters=6\nsize=1\n\n[connected]\noutput=90000\n" + HEAD  # 2.2 GB of weights
    m = build_model(tmp_path / "big.cfg", text=text, init=False)
    with pytest.raises(ExportError, match=r"^the model's weights need 2.21 GB, above the 2 GB an ONNX file can hold"):
        to_onnx_model(m)


@pytest.mark.parametrize("command", ["convert", "detect", "parity", "bench"])
def test_every_cfg_command_has_strict(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "--strict" in r.output and "Darknet does not read" in r.output


def test_detect_and_bench_strict_refuse_a_typo(tmp_path, default_model):
    text = Path(default_model.cfg).read_text().replace("activation=leaky", "activaton=leaky", 1)
    cfg = tmp_path / "typo.cfg"
    cfg.write_text(text)
    where = f"{cfg}:{line_of(text, 'activaton')}: layer 0 [convolutional]: unknown key 'activaton'"
    one_line_error(invoke("detect", cfg, default_model.weights, DATA / "dog.jpg", "--strict"), where)
    one_line_error(invoke("bench", cfg, default_model.weights, "--iters", "1", "--warmup", "0", "--strict"), where)
    assert listing(tmp_path) == ["typo.cfg"]


def test_bench_checks_its_outputs_first(tmp_path, monkeypatch):
    from darkconv import bench as bm

    monkeypatch.setattr(bm, "prepare", lambda *a, **k: pytest.fail("prepared before checking the outputs"))
    r = invoke("bench", CFG / "yolov3-tiny.cfg", "--json", "/dev/null")
    one_line_error(r, "/dev/null: is a character device")
