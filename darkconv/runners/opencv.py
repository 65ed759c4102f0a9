"""OpenCV DNN backend (``cv2.dnn.readNetFromDarknet``, opencv < 5): an independent reference.

Returns the raw tensors fed to each head (the outputs of the layers before them).
OpenCV's BatchNorm uses eps 1e-6 where Darknet uses 1e-5, so the variances are
shifted by 9e-6 in an OpenCV-only copy of the weights to make it compute Darknet's numbers.
OpenCV does not implement ``new_coords``; such models are refused.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..errors import BackendUnavailable
from .base import Runner


class OpenCVRunner(Runner):
    name = "opencv"

    def __init__(self, cfg, weights, *, threads: int | None = None, exact_bn: bool = True):
        import darkconv

        self.cfg, self.weights, self.threads, self.exact_bn = str(cfg), str(weights), threads, exact_bn
        self.model = darkconv.load(cfg, weights)
        self.spec = self.model.spec

    def activate(self):
        import darkconv

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
        # the torch copy is freed after the first activation: load it again to activate again
        model = self.model if self.model is not None else darkconv.load(self.cfg, self.weights)
        self.model = None
        if self.exact_bn:
            import torch

            with torch.no_grad():
                for _, _, name, t in model.darknet_tensors():
                    if name == "rolling_variance":
                        t.add_(1e-5 - 1e-6)
            fd, self._tmp = tempfile.mkstemp(suffix=".weights")
            os.close(fd)
            model.save_weights(self._tmp)
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
            if not found or model.sections[i].type != "convolutional" or \
                    model.sections[i].str("activation", "logistic") != "linear":
                raise BackendUnavailable(f"OpenCV runner needs a linear [convolutional] before head layer {h.layer}")
            self.out_names.append(found[0])

    def deactivate(self):
        if getattr(self, "_tmp", None):
            os.unlink(self._tmp)
            self._tmp = None

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self.net.setInput(np.ascontiguousarray(batch, np.float32))
        return [np.array(o, np.float32) for o in self.net.forward(self.out_names)]
