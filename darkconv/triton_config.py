"""Triton model configurations read and written with Triton's own ``ModelConfig`` schema (tritonclient's
``model_config_pb2``): what the repository exporter, ``darkconv serve`` and the Triton runner share, so that
none of them imports another.
"""
from __future__ import annotations

from pathlib import Path

from .darknet.spec import ModelSpec
from .errors import DarkconvError, ExportError
from .triton_models import SPEC_PARAM


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:  # pragma: no cover - tritonclient is in requirements.txt
        raise DarkconvError("Triton repositories need tritonclient: pip install 'tritonclient[http,grpc]'") from None
    return model_config_pb2, text_format


def config_text(cfg) -> str:
    _, text_format = _pb()
    return text_format.MessageToString(cfg)


def parse_config(path):
    """A config.pbtxt parsed with Triton's ModelConfig schema; a one-line ExportError naming file:line if not."""
    pb, text_format = _pb()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ExportError(f"cannot read: {e.strerror}", file=str(p)) from None
    cfg = pb.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        line = getattr(e, "GetLine", lambda: None)()
        msg = str(e).split(":", 2)[-1].strip() if line else str(e)
        raise ExportError(f"not a valid Triton model config: {msg}", file=str(p), line=line) from None
    return cfg


def repository_models(repo) -> list[str]:
    """The darkconv networks of a repository: models whose config carries a darkconv spec and are not
    the _pre/_post helpers or ensembles."""
    out = []
    for d in sorted(Path(repo).iterdir()):
        if not (d / "config.pbtxt").is_file():
            continue
        cfg = parse_config(d / "config.pbtxt")
        if cfg.platform == "ensemble" or SPEC_PARAM not in cfg.parameters:
            continue
        if not any((d / "1" / f).is_file() for f in ("model.onnx", "model.plan")):
            continue  # _pre / _post: python code only
        out.append(cfg.name)
    return out


def spec_of(cfg) -> ModelSpec:
    if SPEC_PARAM not in cfg.parameters:
        raise DarkconvError(f"model {cfg.name!r} has no {SPEC_PARAM} parameter: it was not exported by darkconv")
    return ModelSpec.from_json(cfg.parameters[SPEC_PARAM].string_value)
