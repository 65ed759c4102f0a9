"""Every layer's output shape from the cfg alone, torch-free (the size arithmetic of src/parser.c
``parse_*`` and each ``make_*_layer``), and the model spec built from it.

:func:`model_spec` is what a runner needs (input size, letter_box, one :class:`HeadSpec` per
[yolo]/[region] head) for tools that never build a graph (the OpenCV runner, inspection).
``graph/`` builds the torch modules, validates every option with its own messages, and
takes its heads from :func:`yolo_head` / :func:`region_head` here, so the two cannot disagree
(tests/test_spec_torchfree.py checks both give the same spec on every cfg in cfg/).

This walk checks only what a size needs (a reference to a later layer, a zero stride);
everything else is the graph builders' job.
"""
from __future__ import annotations

from .cfg import Cfg, Section
from .spec import NMS_KINDS, HeadSpec, ModelSpec

Shape = tuple[int, int, int]  # (c, h, w)


#: parse_convolutional's default for share_index: no sharing
SHARE_NONE = -1000000000


# -- heads (parse_yolo / parse_region) ------------------------------------------------------
def _nms_kind(s: Section) -> str:
    """parse_yolo: greedynms / diounms, anything else (cornersnms included) means the default NMS.
    darkconv refuses names Darknet does not know at all (a typo would silently change the NMS)."""
    kind = s.str("nms_kind", "default").lower()
    if kind not in NMS_KINDS:
        raise s.error(f"nms_kind={kind!r}: expected one of {', '.join(NMS_KINDS)}", "nms_kind")
    return "default" if kind == "cornersnms" else kind


def _check_head_filters(s: Section, prev: Shape, anchors_used: int, classes: int, coords: int = 4) -> None:
    c = prev[0]
    want = anchors_used * (coords + 1 + classes)
    if c != want:
        p = s.index - 1
        raise s.error(f"layer {p} before it must have filters={want} for classes={classes} and "
                      f"{anchors_used} anchors ({anchors_used}*({coords + 1}+{classes})), the cfg gives {c}: "
                      f"fix filters= in layer {p} or classes= here", "classes")


def _anchors(s: Section, count: int, key: str = "anchors") -> list[tuple[float, float]]:
    """``count`` (w, h) anchor pairs; checked before anything of size ``count`` is built."""
    a = s.floats(key, [])
    if len(a) < 2 * count:
        raise s.error(f"anchors has {len(a)} values, needs {2 * count} (num={count} pairs)", key)
    return [(a[2 * i], a[2 * i + 1]) for i in range(count)]


def yolo_head(s: Section, prev: Shape) -> HeadSpec:
    """[yolo] (parse_yolo): the head that reads the (c, h, w) tensor ``prev``."""
    total = s.int("num", 1, lo=1)
    classes = s.int("classes", 20, lo=1)
    anchors = _anchors(s, total)  # before mask's default range(num): num=10^9 fails here, cheaply
    mask = s.ints("mask", list(range(total)))
    for m in mask:
        if not 0 <= m < total:
            raise s.error(f"mask entry {m} is out of range for num={total}", "mask")
    _check_head_filters(s, prev, len(mask), classes)
    return HeadSpec("yolo", s.index, classes, tuple(anchors[m] for m in mask), tuple(mask), tuple(prev[1:]),
                    s.float("scale_x_y", 1.0), s.int("new_coords", 0), _nms_kind(s), s.float("beta_nms", 0.6))


def region_head(s: Section, prev: Shape) -> HeadSpec:
    """[region] (parse_region): reads neither nms_kind nor beta_nms, so always the default NMS.
    Of its other keys only softmax (default 0) and classfix (-1: get_region_boxes zeroes the
    objectness under .5) act at inference; map= and the rest train (keys.IGNORED)."""
    num = s.int("num", 1, lo=1)
    classes = s.int("classes", 20, lo=1)
    coords = s.int("coords", 4)
    if coords != 4:  # get_region_boxes (src/region_layer.c) steps through entries as classes + 5
        raise s.error(f"coords={coords}: only 4 is supported (Darknet's region decoding assumes 4 too)", "coords")
    if s.has("tree"):  # softmax_tree + hierarchy_predictions change the class probabilities
        raise s.error("[region] tree= (YOLO9000 hierarchical softmax) is not supported by darkconv", "tree")
    anchors = _anchors(s, num)
    _check_head_filters(s, prev, num, classes, coords)
    return HeadSpec("region", s.index, classes, tuple(anchors), tuple(range(num)), tuple(prev[1:]),
                    1.0, 0, "default", 0.6, softmax=bool(s.int("softmax", 0)), classfix=s.int("classfix", 0))


HEADS = {"yolo": yolo_head, "region": region_head}


# -- output shapes -------------------------------------------------------------------------
def _ref(s: Section, key: str, raw: int) -> int:
    idx = s.index + raw if raw < 0 else raw
    if not 0 <= idx < s.index:
        raise s.error(f"{key}={raw} points to layer {idx}, but only layers 0..{s.index - 1} "
                      "come before this one", key)
    return idx


def _blurred(antialiasing: int, sy: int, sx: int, h: int, w: int) -> tuple[int, int]:
    size, pad = (2, 0) if antialiasing == 2 else (3, 1)
    return (h + 2 * pad - size) // sy + 1, (w + 2 * pad - size) // sx + 1


def _positive(s: Section, key: str, value: int) -> int:
    if value < 1:
        raise s.error(f"{key}={value} must be at least 1", key)
    return value


def _conv(s: Section, c: int, h: int, w: int) -> Shape:
    n, size = s.int("filters", 1), s.int("size", 1)
    sx, sy = s.int("stride_x", -1), s.int("stride_y", -1)
    if sx < 1 or sy < 1:  # parse_convolutional: stride only as fallback
        stride = _positive(s, "stride", s.int("stride", 1))
        sx, sy = (stride if sx < 1 else sx), (stride if sy < 1 else sy)
    padding = size // 2 if s.int("pad", 0) else s.int("padding", 0)
    aa = s.int("antialiasing", 0)
    ssy, ssx = (1, 1) if aa else (sy, sx)
    oh, ow = (h + 2 * padding - size) // ssy + 1, (w + 2 * padding - size) // ssx + 1
    return (n, *(_blurred(aa, sy, sx, oh, ow) if aa else (oh, ow)))


def _pool(s: Section) -> tuple[int, int, int, int]:
    stride = s.int("stride", 1)
    sx = _positive(s, "stride_x" if s.has("stride_x") else "stride", s.int("stride_x", stride))
    sy = _positive(s, "stride_y" if s.has("stride_y") else "stride", s.int("stride_y", stride))
    size = s.int("size", stride)
    return size, sx, sy, s.int("padding", size - 1)


def _maxpool(s: Section, c: int, h: int, w: int) -> Shape:
    if s.int("maxpool_depth", 0):
        return (s.int("out_channels", 1), h, w)
    size, sx, sy, padding = _pool(s)
    aa = s.int("antialiasing", 0)
    psy, psx = (1, 1) if aa else (sy, sx)
    oh, ow = (h + padding - size) // psy + 1, (w + padding - size) // psx + 1
    return (c, *(_blurred(aa, sy, sx, oh, ow) if aa else (oh, ow)))


def _local_avgpool(s: Section, c: int, h: int, w: int) -> Shape:
    size, sx, sy, padding = _pool(s)
    return (c, (h + padding - size) // sy + 1, (w + padding - size) // sx + 1)


def _upsample(s: Section, c: int, h: int, w: int) -> Shape:
    stride = s.int("stride", 2)
    if stride == 0:
        raise s.error("stride=0 is not valid", "stride")
    return (c, h * stride, w * stride) if stride > 0 else (c, h // -stride, w // -stride)


def _reorg(s: Section, c: int, h: int, w: int) -> Shape:
    stride = _positive(s, "stride", s.int("stride", 1))
    return (c * stride * stride, h // stride, w // stride)


def layer_shapes(cfg: Cfg, input_shape: Shape) -> list[Shape]:
    """The (c, h, w) output of every layer section of ``cfg`` for a (c, h, w) network input."""
    shapes: list[Shape] = []

    def at(i: int) -> Shape:
        return input_shape if i < 0 else shapes[i]

    for s in cfg.layers:
        prev = at(s.index - 1)
        c, h, w = prev
        t = s.type
        if t == "convolutional":
            out = _conv(s, c, h, w)
        elif t == "maxpool":
            out = _maxpool(s, c, h, w)
        elif t == "local_avgpool":
            out = _local_avgpool(s, c, h, w)
        elif t == "avgpool":
            out = (c, 1, 1)
        elif t == "upsample":
            out = _upsample(s, c, h, w)
        elif t in ("reorg", "reorg3d"):
            out = _reorg(s, c, h, w)
        elif t == "route":
            idx = [_ref(s, "layers", r) for r in (s.ints("layers") or [])]
            if not idx:
                raise s.error("route needs layers=", "layers")
            groups = _positive(s, "groups", s.int("groups", 1))
            first = at(idx[0])
            out = (sum(at(i)[0] // groups for i in idx), first[1], first[2])
        elif t == "scale_channels":
            out = at(_ref(s, "from", s.int("from", 0)))
        elif t == "connected":
            out = (s.int("output", 1), 1, 1)
        elif t in ("shortcut", "sam", "dropout", "empty", "silence", "activation", "batchnorm", "softmax",
                   "yolo", "region"):
            out = prev
        else:
            raise s.error(f"[{s.name}] is recognised but not supported by darkconv")
        shapes.append(tuple(int(v) for v in out))
    return shapes


def model_spec(cfg: Cfg, width: int | None = None, height: int | None = None, *, source: dict | None = None
               ) -> ModelSpec:
    """The :class:`ModelSpec` of ``cfg`` at the [net] size (or ``width`` x ``height``), without torch."""
    net = cfg.net
    w, h, c = width or net.int("width", 0), height or net.int("height", 0), net.int("channels", 0)
    if w <= 0 or h <= 0 or c <= 0:
        raise net.error("[net] needs positive width, height and channels")
    shapes = layer_shapes(cfg, (c, h, w))
    heads = tuple(HEADS[s.type](s, (c, h, w) if s.index == 0 else shapes[s.index - 1])
                  for s in cfg.layers if s.type in HEADS)
    if not heads:
        from ..errors import CfgError
        raise CfgError("the cfg has no [yolo] or [region] layer: darkconv needs a detector", file=cfg.path)
    return ModelSpec(w, h, c, bool(net.int("letter_box", 0)), heads, (), dict(source or {"cfg": str(cfg.path)}))


def tensor_layout(cfg: Cfg, input_shape: Shape | None = None) -> list[tuple[int, str, str, int]]:
    """``(layer, section type, tensor name, float count)`` of every tensor of a ``.weights`` file, in file
    order (load_convolutional_weights, load_connected_weights, load_batchnorm_weights, [shortcut] weights)."""
    net = cfg.net
    input_shape = input_shape or (net.int("channels", 0), net.int("height", 0), net.int("width", 0))
    shapes = layer_shapes(cfg, input_shape)
    out = []
    for s in cfg.layers:
        i, t = s.index, s.type
        c = (input_shape if i == 0 else shapes[i - 1])[0]
        if t == "convolutional" and s.has("share_index") and s.int("share_index") != SHARE_NONE:
            continue  # computes with an earlier conv's tensors: nothing of its own in the file
        if t == "convolutional":
            n, size, groups = shapes[i][0], s.int("size", 1), s.int("groups", 1)
            bn = bool(s.int("batch_normalize", 0) or s.int("cbn", 0))
            out.append((i, t, "biases", n))
            if bn:
                out += [(i, t, k, n) for k in ("scales", "rolling_mean", "rolling_variance")]
            out.append((i, t, "weights", n * (c // groups) * size * size))
        elif t == "connected":
            p = input_shape if i == 0 else shapes[i - 1]
            n = shapes[i][0]
            out += [(i, t, "biases", n), (i, t, "weights", n * p[0] * p[1] * p[2])]
            if s.int("batch_normalize", 0):
                out += [(i, t, k, n) for k in ("scales", "rolling_mean", "rolling_variance")]
        elif t == "batchnorm":
            out += [(i, t, k, c) for k in ("biases", "scales", "rolling_mean", "rolling_variance")]
        elif t == "shortcut":
            wt = {"per_layer": "per_feature"}.get(s.str("weights_type", "none"), s.str("weights_type", "none"))
            k = len(s.ints("from") or []) + 1
            count = {"per_feature": k, "per_channel": k * c}.get(wt, 0)
            if count:
                out.append((i, t, "weights", count))
    return out
