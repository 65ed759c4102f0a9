"""Strict fakes of TensorRT (10.0.1, 10.13.3.9, 11.4.0.106) and cuda-python for the tests.

Installed only inside tests (``monkeypatch`` on ``sys.modules``); see trt.py and cudart.py for the
contract each enforces and tests/data/trt_symbols.json (scripts/extract_trt_symbols.py) for where
their names and enum values come from.
"""
from .cudart import FakeCudart
from .cudart import install as install_cudart
from .models import tiny_onnx
from .symbols import CUDA_VERSIONS, TRT_VERSIONS
from .trt import make_tensorrt
from .trt import install as install_tensorrt

__all__ = ["FakeCudart", "install_cudart", "tiny_onnx", "CUDA_VERSIONS", "TRT_VERSIONS", "make_tensorrt",
           "install_tensorrt"]
