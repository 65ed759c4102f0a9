"""The .cfg reader (read_cfg / read_option / option_find_* in Darknet) and cfg-level errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import darkconv
from darkconv.darknet.cfg import parse_cfg
from darkconv.errors import CfgError
from darkconv.graph.model import build_model

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"  # the project's copies of the reference cfgs

NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"
HEAD = "\n[convolutional]\nfilters=6\nsize=1\nactivation=linear\n\n[yolo]\nmask=0\nanchors=10,14\nclasses=1\nnum=1\n"


def build(tmp_path, text, name="t.cfg"):
    return build_model(tmp_path / name, text=text)


def lineno(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line that contains ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[nth - 1]


# -- lexical rules -----------------------------------------------------------------------------
def test_comments_whitespace_and_crlf(tmp_path):
    text = ("# a comment\r\n; another\r\n[net]\r\n  width = 32\r\n\theight=\t32 # inline\r\nchannels=3;inline\r\n\r\n"
            "[convolutional]\r\n filters = 16 # sixteen\r\nsize=3\r\n  # indented comment\r\npad=1\r\n"
            "activation = leaky ; why not\r\n" + HEAD.replace("\n", "\r\n"))
    m = build(tmp_path, text)
    s = m.sections[0]
    assert (s.type, s.int("filters"), s.int("size"), s.str("activation")) == ("convolutional", 16, 3, "leaky")
    assert m.shapes[0] == (16, 32, 32)
    assert s.options["filters"][1] == 9  # keys remember their line (CRLF counted once)


def test_whitespace_inside_values_is_removed(tmp_path):
    """Darknet's strip() deletes every blank of the line, also inside values: "1 0" reads as 10."""
    cfg = parse_cfg(tmp_path / "t.cfg", NET + "[convolutional]\nfil ters = 1 0\nanchors = 1, 2,  3\n")
    s = cfg.layers[0]
    assert s.int("filters") == 10 and s.floats("anchors") == [1.0, 2.0, 3.0]


def test_section_aliases(tmp_path):
    text = ("[network]\nwidth=32\nheight=32\nchannels=3\n\n[conv]\nfilters=4\nsize=3\npad=1\n"
            "\n[max]\nsize=2\nstride=2\n"
            "\n[local_avg]\nsize=2\nstride=1\n\n[avg]\n\n[conn]\noutput=4\n\n[soft]\n\n[reorg3d]\nstride=1\n\n[empty]\n"
            "\n[silence]\n" + HEAD)
    m = build(tmp_path, text)
    assert [s.type for s in m.sections[:9]] == ["convolutional", "maxpool", "local_avgpool", "avgpool", "connected",
                                                "softmax", "reorg3d", "empty", "silence"]
    assert m.shapes[8] == (4, 1, 1)
    assert [s.name for s in m.sections[:3]] == ["conv", "max", "local_avg"]


def test_atoi_and_atof_semantics(tmp_path):
    cfg = parse_cfg(tmp_path / "t.cfg", NET + "[convolutional]\nfilters=16.9\nsize=3abc\nstride=+2\ngroups=-1\n"
                                                "scale=1.5e1x\nx=.5\ny=-.25\n")
    s = cfg.layers[0]
    assert (s.int("filters"), s.int("size"), s.int("stride"), s.int("groups")) == (16, 3, 2, -1)
    assert (s.float("scale"), s.float("x"), s.float("y")) == (15.0, 0.5, -0.25)
    assert s.int("missing", 7) == 7 and s.float("missing", 0.5) == 0.5


def test_first_duplicate_key_wins(tmp_path):
    """option_find returns the first matching key of a section."""
    m = build(tmp_path, NET + "[convolutional]\nfilters=8\nsize=1\nfilters=4\n" + HEAD)
    assert m.shapes[0][0] == 8


@pytest.mark.parametrize("value", ["abc", "", "-", "x12", "."])
def test_bad_number(tmp_path, value):
    text = NET + f"\n[convolutional]\nsize=1\nfilters={value}\n" + HEAD
    with pytest.raises(CfgError) as e:
        build(tmp_path, text)
    assert str(e.value).startswith(f"{tmp_path / 't.cfg'}:{lineno(text, 'filters=')}: layer 0 [convolutional]: ")
    assert f"filters={value!r} is not a number" in str(e.value)


def test_bad_float(tmp_path):
    text = NET + "\n[convolutional]\nfilters=6\nsize=1\nactivation=linear\n" \
                 "\n[yolo]\nmask=0\nanchors=10,x\nclasses=1\nnum=1\n"
    with pytest.raises(CfgError, match=rf"t\.cfg:{lineno(text, 'anchors')}: layer 1 \[yolo\]: anchors='x' is not"):
        build(tmp_path, text)


# -- structural errors, each with file:line ------------------------------------------------------
def test_unknown_section(tmp_path):
    text = NET + "\n[convolutional]\nfilters=4\nsize=1\n\n[convolution]\nfilters=4\n" + HEAD
    with pytest.raises(CfgError, match=rf"t\.cfg:{lineno(text, '[convolution]')}: .*unknown section \[convolution\]"):
        build(tmp_path, text)


def test_unknown_activation(tmp_path):
    text = NET + "\n[convolutional]\nfilters=4\nsize=1\nactivation=lekay\n" + HEAD
    with pytest.raises(CfgError) as e:
        build(tmp_path, text)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 't.cfg'}:{lineno(text, 'lekay')}: layer 0 [convolutional]: ")
    assert "unknown activation 'lekay'" in msg and "leaky" in msg and "mish" in msg


@pytest.mark.parametrize("layers,bad", [("-4", -4), ("-1,-3", -3), ("2", 2), ("5", 5), ("0,7", 7)])
def test_route_index_out_of_range(tmp_path, layers, bad):
    text = NET + "\n[convolutional]\nfilters=4\nsize=1\n\n[convolutional]\nfilters=4\nsize=1\n" \
                 f"\n[route]\nlayers={layers}\n" + HEAD
    with pytest.raises(CfgError) as e:
        build(tmp_path, text)
    msg = str(e.value)
    target = 2 + bad if bad < 0 else bad
    assert msg.startswith(f"{tmp_path / 't.cfg'}:{lineno(text, 'layers=')}: layer 2 [route]: ")
    assert f"layers={bad} points to layer {target}, but only layers 0..1 come before this one" in msg


@pytest.mark.parametrize("frm", ["-3", "1", "4"])
def test_shortcut_from_out_of_range(tmp_path, frm):
    text = NET + "\n[convolutional]\nfilters=4\nsize=1\n\n[shortcut]\nfrom=" + frm + "\n" + HEAD
    with pytest.raises(CfgError, match=rf"t\.cfg:{lineno(text, 'from=')}: layer 1 \[shortcut\]: from={frm} points to "
                                       r"layer -?\d+, but only layers 0\.\.0 come before this one"):
        build(tmp_path, text)


def test_yolo_filters_mismatch(tmp_path):
    text = (NET + "\n[convolutional]\nfilters=8\nsize=1\n\n[convolutional]\nfilters=255\nsize=1\nactivation=linear\n"
            "\n[yolo]\nmask=0,1,2\nanchors=1,1,2,2,3,3,4,4,5,5,6,6\nclasses=1\nnum=6\n")
    with pytest.raises(CfgError) as e:
        build(tmp_path, text)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 't.cfg'}:{lineno(text, 'classes=1')}: layer 2 [yolo]: ")
    assert re.search(r"layer 1 before it must have filters=18 for classes=1 and 3 anchors .*the cfg gives 255", msg)
    assert "fix filters= in layer 1" in msg


def test_region_filters_mismatch(tmp_path):
    text = (NET + "\n[convolutional]\nfilters=125\nsize=1\nactivation=linear\n"
            "\n[region]\nanchors=1,1,2,2,3,3,4,4,5,5\nclasses=80\ncoords=4\nnum=5\n")
    with pytest.raises(CfgError, match=r"layer 1 \[region\]: layer 0 before it must have filters=425 for classes=80 "
                                       r"and 5 anchors .*gives 125"):
        build(tmp_path, text)


def test_yolo_mask_out_of_range(tmp_path):
    text = NET + "\n[convolutional]\nfilters=6\nsize=1\n\n[yolo]\nmask=3\nanchors=1,1,2,2\nclasses=1\nnum=2\n"
    with pytest.raises(CfgError, match=r"mask entry 3 is out of range for num=2"):
        build(tmp_path, text)


def test_missing_net(tmp_path):
    text = "[convolutional]\nfilters=6\nsize=1\n" + HEAD
    with pytest.raises(CfgError, match=r"t\.cfg:1: the first section must be \[net\], found \[convolutional\]"):
        build(tmp_path, text)


def test_second_net(tmp_path):
    text = NET + "\n[convolutional]\nfilters=6\nsize=1\n\n[net]\nwidth=3\n" + HEAD
    with pytest.raises(CfgError, match=rf"t\.cfg:{lineno(text, '[net]', 2)}: a second \[net\]"):
        build(tmp_path, text)


def test_mismatched_route_sizes(tmp_path):
    text = (NET + "\n[convolutional]\nfilters=4\nsize=3\npad=1\n\n[maxpool]\nsize=2\nstride=2\n"
            "\n[route]\nlayers=-1,-2\n" + HEAD)
    with pytest.raises(CfgError, match=rf"t\.cfg:{lineno(text, 'layers=')}: layer 2 \[route\]: layers 1 \(16x16\) and "
                                       r"0 \(32x32\) have different sizes"):
        build(tmp_path, text)


def test_route_groups_must_divide(tmp_path):
    text = NET + "\n[convolutional]\nfilters=5\nsize=1\n\n[route]\nlayers=-1\ngroups=2\ngroup_id=1\n" + HEAD
    with pytest.raises(CfgError, match="5 channels, not divisible by groups=2"):
        build(tmp_path, text)


@pytest.mark.parametrize("text,pattern", [
    ("", "no sections found"),
    ("# only comments\n; here\n", "no sections found"),
    ("width=3\n[net]\n", r"t\.cfg:1: option 'width=3' before any \[section\]"),
    ("[net\nwidth=3\n", r"t\.cfg:1: malformed section header"),
    (NET + "[convolutional]\nfilters\n", r"t\.cfg:6: line 'filters' is not key=value"),
    (NET, "has \\[net\\] but no layers"),
    (NET + "[convolutional]\nfilters=6\nsize=1\n", "no \\[yolo\\] or \\[region\\] layer"),
    ("[net]\nwidth=32\nchannels=3\n" + HEAD, "positive width, height and channels"),
])
def test_structure_errors(tmp_path, text, pattern):
    with pytest.raises(CfgError, match=pattern):
        build(tmp_path, text)


def test_binary_file_as_cfg(tmp_path):
    p = tmp_path / "yolo.weights"
    p.write_bytes(b"\x00\x00\x00\x00\x02\x00\x00\x00" + bytes(range(256)))
    with pytest.raises(CfgError, match="binary file, not a Darknet .cfg"):
        darkconv.load(p)


def test_missing_cfg_file(tmp_path):
    with pytest.raises(CfgError, match="cannot read cfg"):
        darkconv.load(tmp_path / "nope.cfg")


def test_dontload_is_refused(tmp_path):
    with pytest.raises(CfgError, match="dontload=1 is not supported"):
        build(tmp_path, NET + "[convolutional]\nfilters=6\nsize=1\ndontload=1\n" + HEAD)


# -- the reference cfgs ----------------------------------------------------------------------------
A3 = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
A3T = ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319))
A4 = ((12, 16), (19, 36), (40, 28), (36, 75), (76, 55), (72, 146), (142, 110), (192, 243), (459, 401))
V2 = ((0.57273, 0.677385), (1.87446, 2.06253), (3.33843, 5.47434), (7.88282, 3.52778), (9.77052, 9.16828))
# name: (width, height, letter_box, [(grid, mask, scale_x_y, new_coords, nms_kind)] or region)
REFERENCE = {
    "yolov3-tiny": (416, 416, False, A3T, [(13, (3, 4, 5), 1.0, 0, "default"), (26, (0, 1, 2), 1.0, 0, "default")]),
    "yolov3": (416, 416, False, A3, [(13, (6, 7, 8), 1.0, 0, "default"), (26, (3, 4, 5), 1.0, 0, "default"),
                                     (52, (0, 1, 2), 1.0, 0, "default")]),
    "yolov3-spp": (608, 608, False, A3, [(19, (6, 7, 8), 1.0, 0, "default"), (38, (3, 4, 5), 1.0, 0, "default"),
                                         (76, (0, 1, 2), 1.0, 0, "default")]),
    "yolov4": (608, 608, False, A4, [(76, (0, 1, 2), 1.2, 0, "greedynms"), (38, (3, 4, 5), 1.1, 0, "greedynms"),
                                     (19, (6, 7, 8), 1.05, 0, "greedynms")]),
    "yolov4-tiny": (416, 416, False, A3T, [(13, (3, 4, 5), 1.05, 0, "greedynms"),
                                           (26, (1, 2, 3), 1.05, 0, "greedynms")]),
    "yolov4-csp": (512, 512, True, A4, [(64, (0, 1, 2), 2.0, 1, "diounms"), (32, (3, 4, 5), 2.0, 1, "diounms"),
                                        (16, (6, 7, 8), 2.0, 1, "diounms")]),
    "yolov7-tiny": (416, 416, False, A3, [(52, (0, 1, 2), 2.0, 1, "diounms"), (26, (3, 4, 5), 2.0, 1, "diounms"),
                                          (13, (6, 7, 8), 2.0, 1, "diounms")]),
    "yolov2": (416, 416, False, V2, "region"),
    "yolov2-tiny": (416, 416, False, V2, "region"),
}


def section_indices(path, kinds):
    """Darknet layer index of every section of the given kinds, counted straight from the file."""
    heads, i = [], -2
    for line in path.read_text().splitlines():
        line = "".join(line.split())
        if line.startswith("["):
            i += 1
            if line[1:-1] in kinds:
                heads.append(i)
    return heads


def test_every_reference_cfg_is_covered():
    """Each shipped cfg has its heads checked here or is one of the zoo models of test_zoo_models.py."""
    from test_zoo_models import ZOO

    assert sorted(p.stem for p in CFG_DIR.glob("*.cfg")) == sorted([*REFERENCE, *ZOO])


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_cfg_heads(name):
    path = CFG_DIR / f"{name}.cfg"
    w, h, letter_box, anchors, heads = REFERENCE[name]
    m = darkconv.load(path)
    spec = m.spec
    assert (spec.width, spec.height, spec.channels, spec.letter_box, spec.classes) == (w, h, 3, letter_box, 80)
    layers = section_indices(path, ("yolo", "region"))
    assert [hd.layer for hd in spec.heads] == layers
    if heads == "region":
        (hd,) = spec.heads
        assert (hd.kind, hd.grid, hd.classes, hd.softmax, hd.nms_kind, hd.new_coords) == \
            ("region", (13, 13), 80, True, "default", 0)
        assert hd.anchors == anchors and hd.mask == (0, 1, 2, 3, 4)
        assert m.shapes[hd.layer - 1] == (425, 13, 13)
        return
    assert len(spec.heads) == len(heads)
    for hd, (grid, mask, sxy, nc, nms) in zip(spec.heads, heads):
        assert hd.kind == "yolo" and hd.grid == (grid, grid) and hd.mask == mask
        assert hd.anchors == tuple(anchors[i] for i in mask)  # anchors selected by mask
        assert (hd.scale_x_y, hd.new_coords, hd.nms_kind, hd.beta_nms) == (pytest.approx(sxy), nc, nms, 0.6)
        assert m.shapes[hd.layer - 1] == (255, grid, grid) and hd.channels == 255
        assert m.sections[hd.layer - 1].type == "convolutional"
        # new_coords heads follow a logistic conv, the others a linear one
        assert m.sections[hd.layer - 1].str("activation") == ("logistic" if nc else "linear")
    assert spec.nms_kind == heads[-1][4]


@pytest.mark.parametrize("name,w,h,grids", [
    ("yolov3", 320, 320, [(10, 10), (20, 20), (40, 40)]),
    ("yolov3", 608, 608, [(19, 19), (38, 38), (76, 76)]),
    ("yolov3", 256, 160, [(5, 8), (10, 16), (20, 32)]),
    ("yolov4-tiny", 320, 192, [(6, 10), (12, 20)]),
    ("yolov2", 608, 608, [(19, 19)]),
])
def test_input_size_override(name, w, h, grids):
    m = darkconv.load(CFG_DIR / f"{name}.cfg", width=w, height=h)
    assert (m.spec.width, m.spec.height) == (w, h)
    assert [hd.grid for hd in m.spec.heads] == grids
    assert [m.shapes[hd.layer - 1][1:] for hd in m.spec.heads] == grids
    if w * h <= 320 * 192:  # a forward pass at the small sizes only (seconds on 2 cores at 608)
        with torch.no_grad():
            outs = m(torch.zeros(1, 3, h, w))
        assert [tuple(o.shape[2:]) for o in outs] == grids
