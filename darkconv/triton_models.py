"""The python-backend models of a darkconv Triton repository (``darkconv export triton``).

Each ``<model>/1/model.py`` that the exporter writes is one import of a class below, so the
server runs *this* code: Darknet-exact decoding and resizing (:func:`darkconv.preprocess.preprocess`),
the one shared postprocessor (:func:`darkconv.postprocess.postprocess`) and, for the ``python``
platform, the ONNX on ONNX Runtime through darkconv's own runner. The spec (input size,
letter_box, heads) comes from the model config's ``darkconv.spec`` parameter.

Tensors cross the python backend through DLPack (``np.from_dlpack`` / ``Tensor.from_dlpack``):
the stub bundled with PyTriton 0.7.0 predates numpy 2 and its ``as_numpy()`` /
``Tensor(name, ndarray)`` corrupt data under numpy 2; DLPack is exact on every version.
Only ``triton_python_backend_utils`` (present inside the server) is imported lazily.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from .darknet.spec import INPUT_NAME, SPEC_KEY, ModelSpec

SPEC_PARAM = SPEC_KEY  # the spec travels under the same key as in ONNX metadata
IMAGE = "IMAGE"
IMAGE_SIZE = "IMAGE_SIZE"
TENSOR_INPUT = INPUT_NAME
DETECTION_OUTPUTS = ("BOXES", "SCORES", "CLASS_IDS", "BOX_IDS", "OBJECTNESS", "NUM_DETECTIONS")


def _pb():
    import triton_python_backend_utils as pb_utils  # provided by the server's python backend

    return pb_utils


def _quiet_dlpack_capsules() -> None:
    """The stub renames consumed DLPack capsules ``used_dlpack`` (the standard says ``used_dltensor``),
    so numpy's capsule destructor reports a harmless error for every output; drop only that one."""
    previous = sys.unraisablehook
    if getattr(previous, "darkconv", False):
        return

    def hook(u):
        if isinstance(u.exc_value, ValueError) and "PyCapsule_GetPointer called with incorrect name" in str(u.exc_value):
            return
        previous(u)

    hook.darkconv = True
    sys.unraisablehook = hook


def parameters(args: dict) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


def tensor_in(request, name: str) -> np.ndarray:
    return np.from_dlpack(_pb().get_input_tensor_by_name(request, name))


def tensor_out(name: str, array: np.ndarray):
    return _pb().Tensor.from_dlpack(name, np.ascontiguousarray(array))


def error_response(message: str):
    pb = _pb()
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message))


class _Model:
    def initialize(self, args):
        _quiet_dlpack_capsules()
        self.params = parameters(args)
        self.spec = ModelSpec.from_json(self.params[SPEC_PARAM])
        self.version_dir = Path(args["model_repository"]) / args["model_version"]

    def finalize(self):
        pass


class OnnxModel(_Model):
    """``<name>`` on the python platform: the darkconv ONNX on ONNX Runtime (darkconv's runner).

    The requests the dynamic batcher hands over in one ``execute`` run as one ONNX Runtime batch.
    """

    def initialize(self, args):
        super().initialize(args)
        from .runners.onnxruntime import OnnxRuntimeRunner

        threads = int(self.params.get("intra_op_threads") or 0) or os.cpu_count() or 1
        # no spin-waiting between ONNX Runtime calls: the server's HTTP/gRPC threads share these cores
        spin = self.params.get("intra_op_spinning", "0")
        self.runner = OnnxRuntimeRunner(self.version_dir / "model.onnx", threads=threads,
                                        session_config={"session.intra_op.allow_spinning": spin})
        self.runner.activate()
        self.outputs = self.spec.head_names

    def execute(self, requests):
        xs = [tensor_in(r, TENSOR_INPUT) for r in requests]
        heads = self.runner.infer(np.concatenate(xs, 0) if len(xs) > 1 else xs[0])
        out, start = [], 0
        for x in xs:
            n = x.shape[0]
            out.append(_pb().InferenceResponse([tensor_out(name, h[start:start + n])
                                                for name, h in zip(self.outputs, heads)]))
            start += n
        return out

    def finalize(self):
        self.runner.deactivate()


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 RGB (OpenCV ``IMREAD_COLOR``, as ``load_image`` reads files)."""
    import cv2

    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else \
        np.ascontiguousarray(data, np.uint8).ravel()
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"cannot decode the image ({buf.size} bytes): corrupt, truncated or unsupported format")
    return np.ascontiguousarray(bgr[:, :, ::-1])


class PreprocessModel(_Model):
    """``<name>_pre``: encoded images -> Darknet-exact network input + original sizes.

    ``IMAGE`` is TYPE_STRING (one encoded file per batch row) or TYPE_UINT8 (the file's bytes,
    rows zero-padded to the longest: JPEG, PNG, BMP and WebP end where their data says).
    """

    def initialize(self, args):
        super().initialize(args)
        cfg = json.loads(args["model_config"])
        self.bytes_input = next(i for i in cfg["input"] if i["name"] == IMAGE)["data_type"] == "TYPE_STRING"

    def execute(self, requests):
        from .preprocess import preprocess

        size = (self.spec.width, self.spec.height)
        out = []
        for r in requests:
            try:
                if self.bytes_input:
                    rows = [bytes(v) for v in _pb().get_input_tensor_by_name(r, IMAGE).as_numpy().ravel()]
                else:
                    rows = list(tensor_in(r, IMAGE))
                images = [decode_image(b) for b in rows]
            except ValueError as e:
                out.append(error_response(str(e)))
                continue
            x = np.stack([preprocess(im, size, self.spec.letter_box) for im in images])
            wh = np.array([[im.shape[1], im.shape[0]] for im in images], np.int64)
            out.append(_pb().InferenceResponse([tensor_out(TENSOR_INPUT, x), tensor_out(IMAGE_SIZE, wh)]))
        return out


def pack_detections(dets) -> dict[str, np.ndarray]:
    """Per-image Detections -> batch tensors padded to the longest, at least 1 row (a zero-size tensor
    cannot cross the python backend's DLPack); ``NUM_DETECTIONS`` says how many rows are real."""
    k = max(1, max((len(d) for d in dets), default=0))
    n = len(dets)
    out = {"BOXES": np.zeros((n, k, 4), np.float32), "SCORES": np.zeros((n, k), np.float32),
           "CLASS_IDS": np.full((n, k), -1, np.int64), "BOX_IDS": np.full((n, k), -1, np.int64),
           "OBJECTNESS": np.zeros((n, k), np.float32), "NUM_DETECTIONS": np.zeros((n, 1), np.int64)}
    for i, d in enumerate(dets):
        m = len(d)
        out["BOXES"][i, :m] = d.boxes
        out["SCORES"][i, :m] = d.scores
        out["CLASS_IDS"][i, :m] = d.class_ids
        out["BOX_IDS"][i, :m] = d.box_ids
        out["OBJECTNESS"][i, :m] = d.objectness
        out["NUM_DETECTIONS"][i, 0] = m
    return out


def unpack_detections(outputs: dict[str, np.ndarray]):
    """The inverse of :func:`pack_detections`: a list of :class:`~darkconv.postprocess.Detections`."""
    from .postprocess import Detections

    dets = []
    for i, m in enumerate(np.asarray(outputs["NUM_DETECTIONS"]).reshape(-1)):
        m = int(m)
        dets.append(Detections(np.asarray(outputs["BOXES"][i, :m], np.float32).reshape(-1, 4),
                               np.asarray(outputs["SCORES"][i, :m], np.float32),
                               np.asarray(outputs["CLASS_IDS"][i, :m], np.int64),
                               np.asarray(outputs["OBJECTNESS"][i, :m], np.float32),
                               np.asarray(outputs["BOX_IDS"][i, :m], np.int64)))
    return dets


class PostprocessModel(_Model):
    """``<name>_post``: raw heads + original sizes -> detections, by :func:`darkconv.postprocess.postprocess`.

    ``thresh`` / ``nms`` come from the config's parameters; a request may override them with its
    own ``thresh`` / ``nms`` parameters.
    """

    def initialize(self, args):
        super().initialize(args)
        self.heads = self.spec.head_names
        self.thresh = float(self.params.get("thresh", 0.25))
        self.nms = float(self.params.get("nms", 0.45))

    def execute(self, requests):
        from .postprocess import postprocess

        out = []
        for r in requests:
            heads = [tensor_in(r, h) for h in self.heads]
            wh = tensor_in(r, IMAGE_SIZE).reshape(-1, 2)
            thresh, nms = self.thresh, self.nms
            try:
                req = json.loads(r.parameters() or "{}") if hasattr(r, "parameters") else {}
                thresh, nms = float(req.get("thresh", thresh)), float(req.get("nms", nms))
            except (TypeError, ValueError):
                out.append(error_response("request parameters thresh/nms must be numbers"))
                continue
            dets = postprocess(heads, self.spec, [(int(w), int(h)) for w, h in wh], thresh=thresh, nms=nms)
            packed = pack_detections(dets)
            out.append(_pb().InferenceResponse([tensor_out(k, packed[k]) for k in DETECTION_OUTPUTS]))
        return out
