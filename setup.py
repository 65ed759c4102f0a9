import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup

version = {}
for line in Path("darkconv/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

# Darknet's preprocessing (darkconv/_cresize.c) and NMS (darkconv/_cnms.c) in C. They must be compiled without
# floating-point contraction or fast math (after any CFLAGS): a fused multiply-add would change the last bit of
# Darknet's resize or IoU. Optional: where they cannot be built, darkconv runs the same numbers in NumPy (slower).
C_FLAGS = ["/O2", "/fp:precise"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]
C_KERNELS = [Extension(f"darkconv.{name}", [f"darkconv/{name}.c"], extra_compile_args=C_FLAGS, optional=True)
             for name in ("_cresize", "_cnms")]

setup(
    name="darkconv",
    version=version["__version__"],
    description="Darknet YOLO (.cfg + .weights) to PyTorch, ONNX (FP32/FP16/INT8) and TensorRT, exact to Darknet",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["darkconv", "darkconv.*"]),
    package_data={"darkconv": ["data/*"]},
    ext_modules=C_KERNELS,
    install_requires=[
        "numpy>=1.24,<3",
        "torch>=2.4",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "click>=8.1",
        "opencv-python-headless>=4.8,<5",
        "tqdm>=4.60",
        "faster-coco-eval>=1.8",
    ],
    extras_require={
        "trt": ["tensorrt>=10.0,<12", "cuda-python>=12.0"],
        "plot": ["matplotlib>=3.7"],
        "triton": ["tritonclient[http,grpc]>=2.50,<3", "protobuf>=6.31.1,<7"],
        "dev": ["pytest>=7", "matplotlib>=3.7", "pycocotools>=2.0.7"],
    },
    entry_points={"console_scripts": ["darkconv=darkconv.cli:main"]},
)
