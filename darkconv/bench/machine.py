"""The machine and software a result was measured on (CPU model and SIMD flags, cores, load, GPU, versions)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

import numpy as np

from .. import __version__


def _dist_version(*names) -> str | None:
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    """The CPU's model name (:func:`darkconv.cpu.cpu_info`, else what the platform module says)."""
    from ..cpu import cpu_info

    return cpu_info().model or platform.processor() or platform.machine() or "unknown"


CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_int8", "amx_bf16", "neon", "asimd")


def cpu_features() -> list[str]:
    """The SIMD features that decide FP32 / FP16 / INT8 speed (the flags :func:`darkconv.cpu.cpu_info` read)."""
    from ..cpu import cpu_info

    flags = cpu_info().flags
    return [f for f in CPU_FEATURES if f in flags]


def gpu_name() -> str | None:
    """The first NVIDIA GPU (nvidia-smi, else torch.cuda when torch is loaded), or None."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
            if out.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - best effort
            pass
    return None


def tensorrt_version() -> str | None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    from ..export.tensorrt import trt_available
    return trt_available()


def environment(threads: int | None = None) -> dict:
    """Machine and software: what a result needs to be compared with another one."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": affinity,
        "cpu_features": cpu_features(),
        "threads": threads,
        "load_avg_1_5_15": load,
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "darkconv": __version__,
            "numpy": np.__version__,
            "torch": _dist_version("torch"),
            "onnx": _dist_version("onnx"),
            "onnxruntime": _dist_version("onnxruntime", "onnxruntime-gpu"),
            "opencv": _dist_version("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
            "tensorrt": tensorrt_version(),
        },
    }
