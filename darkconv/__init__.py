"""darkconv: Darknet YOLO models, exact, on PyTorch, ONNX Runtime and TensorRT."""
from __future__ import annotations

__version__ = "0.1.0"

from . import postprocess, preprocess  # noqa: E402,F401  (numpy only; ``darkconv.preprocess(...)`` is callable)


def load(cfg_path, weights_path=None, *, width: int | None = None, height: int | None = None,
         strict: bool | None = None, darknet_cpu_avx_maxpool: bool = False):
    """Build the torch module for a Darknet cfg (eval mode) and load its .weights.

    Without ``weights_path`` the parameters are left at their default init (structure tests).
    ``module(x)`` returns one raw head tensor per [yolo]/[region] layer, in cfg order;
    ``module.spec`` holds what pre/postprocessing need. A cfg key Darknet does not read is a
    warning (``strict=True``: an error; ``None``: the process default, ``--strict`` in the CLI);
    a network above the memory limits (``DARKCONV_MAX_*_GB``) is refused before allocation.
    ``darknet_cpu_avx_maxpool=True`` reproduces the stride-1 maxpools of Darknet's CPU build with
    AVX (``forward_maxpool_layer_avx``), which differ from its GPU build near the left edge; only
    for comparing against such a build (the default matches the GPU and non-AVX builds).
    """
    from .graph.layers import set_darknet_cpu_avx_maxpool
    from .graph.model import build_model

    model = build_model(cfg_path, width, height, strict=strict, init=weights_path is None)
    if darknet_cpu_avx_maxpool:
        set_darknet_cpu_avx_maxpool(model)
    if weights_path is not None:
        model.load_weights(weights_path)
    return model


def evaluate(model, weights=None, data=None, **kwargs):
    """Darknet's ``detector map``, COCO metrics or agreement of ``model`` on ``data``; see
    :func:`darkconv.eval.evaluate` for the options. Returns an :class:`darkconv.eval.EvalResult`."""
    from .eval import evaluate as _evaluate

    return _evaluate(model, weights, data, **kwargs)
