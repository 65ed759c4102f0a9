"""PyTorch backend: the DarknetModel itself (CPU, or CUDA when available)."""
from __future__ import annotations

import numpy as np

from .base import Runner, outputs_by_name


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, cfg, weights=None, *, width=None, height=None, device: str | None = None,
                 threads: int | None = None, precision: str = "fp32", model=None):
        self.cfg, self.weights, self.width, self.height = cfg, weights, width, height
        self.device_name, self.threads, self.precision = device, threads, precision
        self.model = model
        if model is not None:
            self.spec = model.spec

    def activate(self):
        import torch

        import darkconv

        if self.threads:
            torch.set_num_threads(int(self.threads))
        if self.model is None:
            self.model = darkconv.load(self.cfg, self.weights, width=self.width, height=self.height)
        self.spec = self.model.spec
        self.device = torch.device(self.device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32
        if self.precision == "fp16" and self.device.type == "cpu":
            self.dtype = torch.float32  # no fast FP16 on CPU: stay exact
        self.model.to(self.device, self.dtype).eval()
        # the module returns its heads in its own head_layers order: pick them by name
        produced = [f"head_{layer}" for layer in self.model.head_layers]
        self._order = [produced.index(n) for n in outputs_by_name(self.spec, produced, where=str(self.cfg))]

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device, self.dtype)
            heads = self.model(x)
            return [heads[k].float().cpu().numpy() for k in self._order]

    def describe(self) -> str:
        return f"torch ({getattr(self, 'device', 'cpu')}, {self.precision})"
