"""The model spec: everything pre- and postprocessing need, derived once from the cfg.

It travels with every artifact (ONNX ``metadata_props``, the TensorRT sidecar) so
that any runner's raw head tensors are decoded by the one shared postprocessor.
Pure data, JSON round-trippable, numpy-free.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

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
