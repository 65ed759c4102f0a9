"""OpenCV DNN backend (``cv2.dnn.readNetFromDarknet``, opencv < 5): an independent reference.

Returns the raw tensors fed to each head (the outputs of the layers before them), by OpenCV layer
name. Torch-free: the spec comes from :mod:`darkconv.darknet.shapes`, the BN shift is done on the
file's floats.
OpenCV's BatchNorm uses eps 1e-6 where Darknet uses 1e-5, so the variances are
shifted by 9e-6 in an OpenCV-only copy of the weights to make it compute Darknet's numbers.
OpenCV does not implement ``new_coords``; such models are refused.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..darknet.cfg import parse_cfg
from ..darknet.shapes import model_spec, tensor_layout
from ..darknet.weights import WeightsReader, WeightsWriter
from ..errors import BackendUnavailable, WeightsError
from .base import Runner


def shift_bn_variance(src, dst, layout, delta: float) -> None:
    """Copy the ``.weights`` file ``src`` to ``dst`` with ``delta`` added to every BatchNorm
    ``rolling_variance`` (float32, as Darknet stores them); header and every other float unchanged."""
    reader = WeightsReader(src)
    floats = np.array(reader.take(reader.remaining, -1, "net"), dtype="<f4")
    offset = 0
    for _, _, name, count in layout:
        if name == "rolling_variance":
            floats[offset:offset + count] += np.float32(delta)
        offset += count
    h = reader.header
    writer = WeightsWriter(h.major, h.minor, h.revision, h.seen)
    writer.add(floats)
    writer.write(dst)


class OpenCVRunner(Runner):
    name = "opencv"

    def __init__(self, cfg, weights, *, threads: int | None = None, exact_bn: bool = True):
        self.cfg, self.weights, self.threads, self.exact_bn = str(cfg), str(weights), threads, exact_bn
        self._cfg = parse_cfg(self.cfg)
        self.spec = model_spec(self._cfg, source={"cfg": self.cfg, "weights": self.weights})
        self._layout = tensor_layout(self._cfg)
        want = sum(n for *_, n in self._layout)
        have = WeightsReader(self.weights).remaining
        if have != want:
            raise WeightsError(f"holds {have} floats after the header but the cfg's layers need {want}: "
                               "the weights belong to a different cfg", file=self.weights)

    def activate(self):
        try:
            import cv2
        except ImportError:  # pragma: no cover
            raise BackendUnavailable("OpenCV is not installed: pip install 'opencv-python-headless<5'") from None
        if not hasattr(cv2.dnn, "readNetFromDarknet"):
            raise BackendUnavailable(f"OpenCV {cv2.__version__} has no Darknet importer: pip install 'opencv-python-headless<5'")
        if any(h.new_coords for h in self.spec.heads):
            raise BackendUnavailable("OpenCV DNN does not implement new_coords=1 (yolov4-csp/yolov7 style heads)")
        if self.threads:
            cv2.setNumThreads(int(self.threads))
        weights = self.weights
        self._tmp = None
        if self.exact_bn:
            fd, self._tmp = tempfile.mkstemp(suffix=".weights")
            os.close(fd)
            shift_bn_variance(self.weights, self._tmp, self._layout, 1e-5 - 1e-6)
            weights = self._tmp
        self.net = cv2.dnn.readNetFromDarknet(self.cfg, weights)
        if hasattr(self.net, "enableWinograd"):
            self.net.enableWinograd(False)  # Winograd 3x3 adds ~1e-5 error per layer: this runner is a reference
        names = set(self.net.getLayerNames())
        # OpenCV names a Darknet conv layer i "conv_i" (+ "bn_i" with batch_normalize); heads follow a linear conv
        self.out_names = []
        for h in self.spec.heads:
            i = h.layer - 1
            found = [n for n in (f"bn_{i}", f"conv_{i}") if n in names]
            sec = self._cfg.layers[i]
            if not found or sec.type != "convolutional" or sec.str("activation", "logistic") != "linear":
                raise BackendUnavailable(f"OpenCV runner needs a linear [convolutional] before head layer {h.layer}")
            self.out_names.append(found[0])

    def deactivate(self):
        if getattr(self, "_tmp", None):
            os.unlink(self._tmp)
            self._tmp = None

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self.net.setInput(np.ascontiguousarray(batch, np.float32))
        return [np.array(o, np.float32) for o in self.net.forward(self.out_names)]
