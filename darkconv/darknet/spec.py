"""The model spec: everything pre- and postprocessing need, derived once from the cfg.

It travels with every artifact (ONNX ``metadata_props``, the TensorRT sidecar) so
that any runner's raw head tensors are decoded by the one shared postprocessor.
Pure data, JSON round-trippable, numpy-free.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from ..errors import ExportError

#: the key the spec's JSON is stored under: ONNX ``metadata_props``, Triton model config parameters
SPEC_KEY = "darkconv.spec"
#: the network input tensor of every artifact (ONNX, engine, served model): float32 (N, C, H, W)
INPUT_NAME = "images"

#: Darknet's NMS kinds (``nms_kind`` in [yolo]/[region]; src/parser.c)
NMS_KINDS = ("default", "greedynms", "diounms", "cornersnms")


@dataclass(frozen=True)
class HeadSpec:
    """One detection head ([yolo] or [region]) as the postprocessor sees it.

    ``anchors`` are the anchors this head uses (already selected by ``mask``) as
    (w, h) pairs: pixels of the network input for [yolo], grid cells for [region].
    The head's raw tensor is (N, len(anchors) * (5 + classes), grid_h, grid_w).
    """

    kind: str                      # "yolo" | "region"
    layer: int                     # Darknet layer index of the head
    classes: int
    anchors: tuple[tuple[float, float], ...]
    mask: tuple[int, ...] = ()
    grid: tuple[int, int] = (0, 0)  # (h, w) of the head tensor
    scale_x_y: float = 1.0
    new_coords: int = 0
    nms_kind: str = "default"
    beta_nms: float = 0.6
    softmax: bool = False          # [region] only: softmax over classes (parse_region: default 0)
    classfix: int = 0              # [region] only: -1 = no classes where objectness < .5 (get_region_boxes)

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)

    @property
    def channels(self) -> int:
        return self.num_anchors * (5 + self.classes)

    @property
    def name(self) -> str:
        """The head's tensor name in every artifact (ONNX output, engine tensor, Triton output)."""
        return f"head_{self.layer}"


@dataclass(frozen=True)
class ModelSpec:
    """Network input and heads; the contract between every backend and the postprocessor."""

    width: int
    height: int
    channels: int = 3
    letter_box: bool = False
    heads: tuple[HeadSpec, ...] = ()
    names: tuple[str, ...] = ()
    source: dict = field(default_factory=dict)  # cfg/weights paths and sha256, darkconv version

    @property
    def classes(self) -> int:
        return self.heads[-1].classes if self.heads else 0

    @property
    def nms_kind(self) -> str:
        """Darknet's detector uses the last layer's nms_kind for the whole image."""
        return self.heads[-1].nms_kind if self.heads else "default"

    @property
    def beta_nms(self) -> float:
        return self.heads[-1].beta_nms if self.heads else 0.6

    @property
    def head_names(self) -> list[str]:
        """Output tensor names, one per head in cfg order: ``head_<darknet layer index>``."""
        return [h.name for h in self.heads]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        heads = tuple(
            HeadSpec(**{**h, "anchors": tuple(tuple(a) for a in h["anchors"]),
                        "mask": tuple(h.get("mask", ())), "grid": tuple(h.get("grid", (0, 0)))})
            for h in d.get("heads", ()))
        return cls(width=int(d["width"]), height=int(d["height"]), channels=int(d.get("channels", 3)),
                   letter_box=bool(d.get("letter_box", False)), heads=heads,
                   names=tuple(d.get("names", ())), source=dict(d.get("source", {})))

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls.from_dict(json.loads(text))

    def with_names(self, names) -> "ModelSpec":
        return ModelSpec(self.width, self.height, self.channels, self.letter_box, self.heads,
                         tuple(names), dict(self.source))

    def with_letterbox(self, letter_box: bool) -> "ModelSpec":
        return ModelSpec(self.width, self.height, self.channels, bool(letter_box), self.heads,
                         self.names, dict(self.source))


def spec_from_cfg(cfg, width: int | None = None, height: int | None = None) -> ModelSpec:
    """The spec of a cfg (a path or a parsed :class:`~darkconv.darknet.cfg.Cfg`), without torch:
    :func:`darkconv.darknet.shapes.model_spec`."""
    from .cfg import Cfg, parse_cfg
    from .shapes import model_spec

    return model_spec(cfg if isinstance(cfg, Cfg) else parse_cfg(cfg), width, height)


def spec_from_json(text: str, where: str | None = None) -> ModelSpec:
    """A ModelSpec from its stored JSON, checked so that the postprocessor can use it as it is: a
    damaged or hand-edited spec is a one-line :class:`ExportError`, never a KeyError or IndexError later."""
    def bad(why: str) -> ExportError:
        return ExportError(f"the {SPEC_KEY} metadata is invalid ({why}): re-export it with `darkconv convert`",
                           file=where)

    try:
        raw = json.loads(text)
    except ValueError as e:
        raise bad(f"not JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise bad(f"a JSON {type(raw).__name__}, not an object")
    try:
        spec = ModelSpec.from_dict(raw)
    except KeyError as e:
        raise bad(f"missing {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise bad(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not (spec.width >= 1 and spec.height >= 1 and spec.channels >= 1):
        raise bad(f"input {spec.width}x{spec.height}x{spec.channels}")
    if not spec.heads:
        raise bad("no heads")
    for k, h in enumerate(spec.heads):
        ok = (h.kind in ("yolo", "region") and isinstance(h.classes, int) and h.classes >= 1 and h.anchors
              and all(len(a) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in a)
                      for a in h.anchors)
              and len(h.grid) == 2 and all(isinstance(g, int) and g >= 1 for g in h.grid)
              and h.nms_kind in NMS_KINDS and isinstance(h.scale_x_y, (int, float)) and math.isfinite(h.scale_x_y)
              and isinstance(h.beta_nms, (int, float)) and math.isfinite(h.beta_nms))
        if not ok:
            raise bad(f"head {k} ({h.kind}, classes={h.classes!r}, {len(h.anchors)} anchors, grid {h.grid!r})")
    return spec
