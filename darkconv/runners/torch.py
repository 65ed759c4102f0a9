"""PyTorch backend: the DarknetModel itself, on the CPU or a CUDA GPU.

``device``: ``None`` (a CUDA GPU when PyTorch sees one, else the CPU), ``"cpu"``, ``"cuda"`` or
``"cuda:N"``. ``precision="fp16"`` runs the model in half precision on CUDA (on the CPU it stays
FP32: no fast FP16 kernels there, and FP32 is exact). ``cuda_graphs=True`` (CUDA only) records
one CUDA graph per input shape on first use and replays it afterwards: the same kernels without
the per-layer launch overhead, which matters for small models and batches; shapes are static per
graph, so a new batch size records a new graph.
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import BackendUnavailable, DarkconvError
from .base import Runner, outputs_by_name

DEVICE_HELP = "cpu | cuda | cuda:N [default: cuda when PyTorch sees a GPU, else cpu]"
NO_GPU_FIX = ("install a CUDA build of PyTorch on a machine with an NVIDIA GPU and driver, or use --device cpu")


def parse_device(device: str | None) -> str | None:
    """Normalise a device string ('CUDA' -> 'cuda', 'cuda:1'); DarkconvError for anything else."""
    if device is None or str(device).strip().lower() in ("", "auto"):
        return None
    d = str(device).strip().lower()
    if d == "gpu":
        d = "cuda"
    if d == "cpu" or re.fullmatch(r"cuda(:\d+)?", d):
        return d
    raise DarkconvError(f"unknown device {device!r}: use {DEVICE_HELP}")


def resolve_device(device: str | None, torch=None) -> str:
    """The torch device to run on; BackendUnavailable (one line naming the fix) when CUDA is asked for
    but PyTorch sees no GPU (CPU-only build, no driver, or no such device index)."""
    if torch is None:
        import torch
    d = parse_device(device)
    available = torch.cuda.is_available()
    if d is None:
        return "cuda" if available else "cpu"
    if d == "cpu":
        return d
    if not available:
        build = getattr(torch.version, "cuda", None)
        why = ("this PyTorch is a CPU-only build" if not build else
               f"PyTorch (CUDA {build}) sees no GPU (is the NVIDIA driver installed?)")
        raise BackendUnavailable(f"--device {d}: no CUDA GPU: {why}; {NO_GPU_FIX}")
    index = int(d.split(":")[1]) if ":" in d else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise BackendUnavailable(f"--device {d}: PyTorch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return d


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, cfg, weights=None, *, width=None, height=None, device: str | None = None,
                 threads: int | None = None, precision: str = "fp32", cuda_graphs: bool = False, model=None):
        self.cfg, self.weights, self.width, self.height = cfg, weights, width, height
        self.device_name = parse_device(device)
        self.threads, self.precision, self.cuda_graphs = threads, str(precision).lower(), bool(cuda_graphs)
        if self.precision not in ("fp32", "fp16"):
            raise DarkconvError(f"the torch backend runs fp32 or fp16, not {precision}")
        self.model = model
        self._graphs: dict[tuple, tuple] = {}
        if model is not None:
            self.spec = model.spec

    def activate(self):
        import torch

        import darkconv

        self.device = torch.device(resolve_device(self.device_name, torch))  # before loading: fail fast
        if self.threads:
            torch.set_num_threads(int(self.threads))
        if self.model is None:
            self.model = darkconv.load(self.cfg, self.weights, width=self.width, height=self.height)
        self.spec = self.model.spec
        cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.precision == "fp16" and cuda else torch.float32
        if self.cuda_graphs and not cuda:
            raise DarkconvError("CUDA graphs need --device cuda")
        self.model.to(self.device, self.dtype).eval()
        # the module returns its heads in its own head_layers order: pick them by name
        produced = [f"head_{layer}" for layer in self.model.head_layers]
        self._order = [produced.index(n) for n in outputs_by_name(self.spec, produced, where=str(self.cfg))]
        self._graphs = {}

    def deactivate(self):
        self._graphs = {}

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device, self.dtype)
            heads = self._replay(x) if self.cuda_graphs else self.model(x)
            # .cpu() waits for the GPU (a synchronizing copy), so the arrays are complete
            return [heads[k].float().cpu().numpy() for k in self._order]

    def _replay(self, x):
        """Run ``x`` through the CUDA graph recorded for its shape (recording it on first use)."""
        import torch

        key = tuple(x.shape)
        if key not in self._graphs:
            static_in = x.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm up outside the graph (allocator, lazy init)
                for _ in range(2):
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return [o.clone() for o in static_out]

    def describe(self) -> str:
        dev = getattr(self, "device", None)
        where = str(dev or self.device_name or "cpu")
        if dev is not None and dev.type == "cuda":
            import torch
            where += f" {torch.cuda.get_device_name(dev)}"
        run = "fp16" if str(getattr(self, "dtype", "")) == "torch.float16" else "fp32"
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        return f"torch ({where}, {run}{graphs})"
