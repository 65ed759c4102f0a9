"""A Triton Inference Server model repository for a darkconv model (``darkconv export triton``).

Layout (``NAME`` defaults to the model file's stem)::

    REPO/NAME/config.pbtxt            the network: raw heads ``head_<layer>`` from input ``images``
    REPO/NAME/1/model.onnx            platform onnxruntime_onnx, or backend python (+ model.py)
    REPO/NAME/1/model.plan            platform tensorrt_plan
    REPO/NAME_pre/                    python: encoded images -> Darknet-exact input + sizes
    REPO/NAME_post/                   python: heads + sizes -> detections (darkconv.postprocess)
    REPO/NAME_detect/                 ensemble: IMAGE -> _pre -> NAME -> _post -> detections
    REPO/NAME_detect_tensors/         ensemble: images + IMAGE_SIZE -> NAME -> _post -> detections

Every config is built as Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``),
written as text, then read back and checked (:func:`validate_repository`): each file parses with
Triton's schema, every model has its version folder and file, tensor names and shapes match the
ONNX, and every ensemble step maps tensors that exist. The darkconv spec rides in each config's
``parameters`` (``darkconv.spec``) so clients and the python models decode with the same one.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..darknet.spec import ModelSpec
from ..io import atomic_write
from ..onnx_meta import onnx_precision
from ..errors import ExportError
from ..triton_config import _pb, config_text, parse_config, repository_models, spec_of  # noqa: F401 - re-exported
from ..triton_models import DETECTION_OUTPUTS, IMAGE, IMAGE_SIZE, SPEC_PARAM, TENSOR_INPUT

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "python": "python"}
IMAGE_INPUTS = ("bytes", "uint8")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHIM = '''"""Triton python-backend model written by `darkconv export triton`; the code is darkconv's ({cls})."""
try:
    from darkconv.triton_models import {cls} as TritonPythonModel  # noqa: F401
except ImportError as e:  # the server's Python must have darkconv: pip install darkconv (in the container)
    raise ImportError(f"this model needs darkconv in the Triton server's Python: pip install darkconv ({{e}})")
'''


@dataclass
class RepositoryInfo:
    repo: Path
    name: str
    platform: str
    models: list[str] = field(default_factory=list)
    spec: ModelSpec | None = None

    @property
    def detect_model(self) -> str:
        return f"{self.name}_detect"


# -- configs ---------------------------------------------------------------------------------
def _tensor(pb, name, dtype, dims):
    return {"name": name, "data_type": pb.DataType.Value(dtype), "dims": list(dims)}


def _params(cfg, values: dict) -> None:
    for k, v in values.items():
        cfg.parameters[k].string_value = str(v)


def io_shapes(onnx_path) -> tuple[tuple[str, list[int]], list[tuple[str, list[int]]], bool]:
    """(input name, dims without batch), [(output name, dims without batch)], dynamic batch? from the ONNX."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}

    def dims(vi):
        d = vi.type.tensor_type.shape.dim
        return [x.dim_value if x.HasField("dim_value") else -1 for x in d], \
            (len(d) > 0 and not d[0].HasField("dim_value"))

    inputs = [i for i in g.input if i.name not in inits]
    (idims, dyn) = dims(inputs[0])
    outs = [(o.name, dims(o)[0][1:]) for o in g.output]
    return (inputs[0].name, idims[1:]), outs, dyn


def model_config(name: str, spec: ModelSpec, platform: str, *, max_batch: int = 8, instances: int = 1,
                 input_dims=None, outputs=None, queue_delay_us: int = 1000, threads: int = 0, spinning: bool = False):
    """The network's config: ``images`` (3, H, W) FP32 in, one FP32 ``head_<layer>`` per head out."""
    pb, _ = _pb()
    from .onnx import head_names

    cfg = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if platform == "python":
        cfg.backend = "python"
    else:
        cfg.platform = PLATFORMS[platform]
    cfg.input.add(**_tensor(pb, TENSOR_INPUT, "TYPE_FP32", input_dims or (spec.channels, spec.height, spec.width)))
    outputs = outputs or [(n, (h.channels, h.grid[0], h.grid[1])) for n, h in zip(head_names(spec), spec.heads)]
    for n, d in outputs:
        cfg.output.add(**_tensor(pb, n, "TYPE_FP32", d))
    _batching(cfg, max_batch, queue_delay_us)
    kind = {"python": "KIND_CPU", "tensorrt": "KIND_GPU", "onnxruntime": "KIND_AUTO"}[platform]
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    params = {SPEC_PARAM: spec.to_json()}
    if platform == "python":
        params["intra_op_threads"] = threads
        params["intra_op_spinning"] = int(spinning)
    _params(cfg, params)
    return cfg


def _batching(cfg, max_batch: int, queue_delay_us: int) -> None:
    if max_batch > 1:
        cfg.dynamic_batching.preferred_batch_size.extend(sorted({max(1, max_batch // 2), max_batch}))
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us


def pre_config(name: str, spec: ModelSpec, *, image_input: str = "bytes", max_batch: int = 8, instances: int = 1):
    pb, _ = _pb()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    if image_input == "bytes":
        cfg.input.add(**_tensor(pb, IMAGE, "TYPE_STRING", [1]))
    else:
        cfg.input.add(**_tensor(pb, IMAGE, "TYPE_UINT8", [-1]))
    cfg.output.add(**_tensor(pb, TENSOR_INPUT, "TYPE_FP32", (spec.channels, spec.height, spec.width)))
    cfg.output.add(**_tensor(pb, IMAGE_SIZE, "TYPE_INT64", [2]))
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    _params(cfg, {SPEC_PARAM: spec.to_json()})
    return cfg


_DET_TYPES = {"BOXES": ("TYPE_FP32", [-1, 4]), "SCORES": ("TYPE_FP32", [-1]), "CLASS_IDS": ("TYPE_INT64", [-1]),
              "BOX_IDS": ("TYPE_INT64", [-1]), "OBJECTNESS": ("TYPE_FP32", [-1]),
              "NUM_DETECTIONS": ("TYPE_INT64", [1])}


def post_config(name: str, spec: ModelSpec, *, max_batch: int = 8, instances: int = 1, thresh: float = 0.25,
                nms: float = 0.45, head_dims=None):
    pb, _ = _pb()
    from .onnx import head_names

    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    dims = head_dims or [(n, (h.channels, h.grid[0], h.grid[1])) for n, h in zip(head_names(spec), spec.heads)]
    for n, d in dims:
        cfg.input.add(**_tensor(pb, n, "TYPE_FP32", d))
    cfg.input.add(**_tensor(pb, IMAGE_SIZE, "TYPE_INT64", [2]))
    for k in DETECTION_OUTPUTS:
        cfg.output.add(**_tensor(pb, k, *_DET_TYPES[k]))
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    _params(cfg, {SPEC_PARAM: spec.to_json(), "thresh": thresh, "nms": nms})
    return cfg


def ensemble_config(name: str, model: str, spec: ModelSpec, *, encoded: bool, image_input: str = "bytes",
                    max_batch: int = 8, input_dims=None, head_dims=None):
    """``NAME_detect`` (encoded images) or ``NAME_detect_tensors`` (preprocessed) -> detections."""
    pb, _ = _pb()
    from .onnx import head_names

    cfg = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch)
    heads = [n for n, _ in head_dims] if head_dims else head_names(spec)
    if encoded:
        cfg.input.add(**(_tensor(pb, IMAGE, "TYPE_STRING", [1]) if image_input == "bytes"
                         else _tensor(pb, IMAGE, "TYPE_UINT8", [-1])))
    else:
        cfg.input.add(**_tensor(pb, TENSOR_INPUT, "TYPE_FP32", input_dims or (spec.channels, spec.height, spec.width)))
    if not encoded:
        cfg.input.add(**_tensor(pb, IMAGE_SIZE, "TYPE_INT64", [2]))
    for k in DETECTION_OUTPUTS:
        cfg.output.add(**_tensor(pb, k, *_DET_TYPES[k]))
    steps = cfg.ensemble_scheduling.step
    if encoded:
        s = steps.add(model_name=f"{model}_pre", model_version=-1)
        s.input_map[IMAGE] = IMAGE
        s.output_map[TENSOR_INPUT] = "_images"
        s.output_map[IMAGE_SIZE] = "_image_size"
        src, size = "_images", "_image_size"
    else:
        src, size = TENSOR_INPUT, IMAGE_SIZE
    s = steps.add(model_name=model, model_version=-1)
    s.input_map[TENSOR_INPUT] = src
    for h in heads:
        s.output_map[h] = f"_{h}"
    s = steps.add(model_name=f"{model}_post", model_version=-1)
    for h in heads:
        s.input_map[h] = f"_{h}"
    s.input_map[IMAGE_SIZE] = size
    for k in DETECTION_OUTPUTS:
        s.output_map[k] = k
    _params(cfg, {SPEC_PARAM: spec.to_json()})
    return cfg





# -- validation ------------------------------------------------------------------------------
def _io(cfg) -> tuple[dict, dict]:
    return ({t.name: (t.data_type, list(t.dims)) for t in cfg.input},
            {t.name: (t.data_type, list(t.dims)) for t in cfg.output})


_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}


def validate_repository(repo, models=None) -> dict:
    """Parse every ``*/config.pbtxt`` under ``repo`` (or only ``models``) and check them together.

    Checks: the schema parse; ``name`` equals the folder; a version folder with the model file
    (``model.onnx``/``model.plan``/``model.py``); for a darkconv ONNX, input/output names and
    dims equal the ONNX's; every ensemble step names a model of the repository, maps only that
    model's inputs/outputs, reads only tensors the ensemble has or an earlier step made, with
    the same data type, and every ensemble output is produced. Returns {name: ModelConfig}.
    """
    pb, _ = _pb()
    repo = Path(repo)
    dirs = [repo / m for m in models] if models else sorted(p for p in repo.iterdir()
                                                             if (p / "config.pbtxt").is_file())
    configs = {}
    for d in dirs:
        path = d / "config.pbtxt"
        cfg = parse_config(path)
        if cfg.name != d.name:
            raise ExportError(f"name {cfg.name!r} differs from the folder {d.name!r}", file=str(path))
        if cfg.platform != "ensemble":
            versions = [v for v in d.iterdir() if v.is_dir() and v.name.isdigit()]
            want = _FILES.get(cfg.platform) or ("model.py" if cfg.backend == "python" else None)
            if want is None:
                raise ExportError(f"neither a known platform nor backend ({cfg.platform!r}/{cfg.backend!r})",
                                  file=str(path))
            if not any((v / want).is_file() for v in versions):
                raise ExportError(f"no version folder with {want}", file=str(d))
            onnx_file = next((v / "model.onnx" for v in versions if (v / "model.onnx").is_file()), None)
            if onnx_file is not None:
                _check_onnx_io(cfg, onnx_file, path)
        configs[cfg.name] = cfg
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            _check_ensemble(cfg, configs, repo, repo / name / "config.pbtxt")
    return configs


def _check_onnx_io(cfg, onnx_file, path) -> None:
    (iname, idims), outs, dyn = io_shapes(onnx_file)
    ins, outputs = _io(cfg)
    if list(ins) != [iname] or ins[iname][1] != idims:
        raise ExportError(f"inputs {dict((k, v[1]) for k, v in ins.items())} differ from the ONNX's "
                          f"{ {iname: idims} }", file=str(path))
    if cfg.max_batch_size > 0 and not dyn:
        raise ExportError("max_batch_size > 0 needs an ONNX with a dynamic batch axis", file=str(path))
    want = {n: d for n, d in outs}
    got = {k: v[1] for k, v in outputs.items()}
    for n, d in got.items():
        if n not in want or (all(x > 0 for x in want[n]) and d != want[n]):
            raise ExportError(f"output {n!r} {d} is not an output of the ONNX ({want})", file=str(path))


def _check_ensemble(cfg, configs, repo, path) -> None:
    pb, _ = _pb()
    ins, outs = _io(cfg)
    have = {k: v[0] for k, v in ins.items()}  # tensor -> data type available so far
    for k, step in enumerate(cfg.ensemble_scheduling.step, 1):
        sub = configs.get(step.model_name)
        if sub is None:
            if (repo / step.model_name / "config.pbtxt").is_file():
                sub = parse_config(repo / step.model_name / "config.pbtxt")
            else:
                raise ExportError(f"step {k}: no model {step.model_name!r} in the repository", file=str(path))
        sub_in, sub_out = _io(sub)
        for model_input, tensor in step.input_map.items():
            if model_input not in sub_in:
                raise ExportError(f"step {k}: {step.model_name} has no input {model_input!r}", file=str(path))
            if tensor not in have:
                raise ExportError(f"step {k}: tensor {tensor!r} is neither an ensemble input nor made by an "
                                  "earlier step", file=str(path))
            if have[tensor] != sub_in[model_input][0]:
                raise ExportError(f"step {k}: {tensor!r} is {pb.DataType.Name(have[tensor])}, "
                                  f"{step.model_name}.{model_input} wants {pb.DataType.Name(sub_in[model_input][0])}",
                                  file=str(path))
        missing = set(sub_in) - set(step.input_map)
        if missing:
            raise ExportError(f"step {k}: inputs {sorted(missing)} of {step.model_name} are not mapped", file=str(path))
        for model_output, tensor in step.output_map.items():
            if model_output not in sub_out:
                raise ExportError(f"step {k}: {step.model_name} has no output {model_output!r}", file=str(path))
            have[tensor] = sub_out[model_output][0]
        if sub.max_batch_size < cfg.max_batch_size:
            raise ExportError(f"step {k}: {step.model_name} has max_batch_size {sub.max_batch_size} < the "
                              f"ensemble's {cfg.max_batch_size}", file=str(path))
    for o, (dtype, _) in outs.items():
        if o not in have or have[o] != dtype:
            raise ExportError(f"ensemble output {o!r} is not produced by any step", file=str(path))


# -- the repository --------------------------------------------------------------------------
def write_config(path, cfg) -> None:
    atomic_write(Path(path), [config_text(cfg).encode()])


def _source_onnx(model, weights, work: Path, precision: str, calib, names, log) -> tuple[Path, ModelSpec]:
    from ..pipeline import model_kind, resolve_names
    from ..onnx_meta import read_spec
    from .onnx import export_onnx

    kind = model_kind(model)
    if kind == "onnx":
        if precision != "fp32" and precision != onnx_precision(model):
            raise ExportError(f"this ONNX is {onnx_precision(model)}: --precision applies to a cfg",
                              file=str(model))
        return Path(model), read_spec(model)
    if kind != "cfg":
        raise ExportError("give a cfg (+ weights) or a darkconv .onnx (an engine: use --platform tensorrt)",
                          file=str(model))
    import darkconv

    if weights is None:
        raise ExportError("a served model needs its .weights: export triton MODEL.cfg MODEL.weights --repo DIR",
                          file=str(model))
    m = darkconv.load(model, weights)
    spec = m.spec.with_names(resolve_names(m.spec, names))
    out = work / "model.onnx"
    if log:
        log(f"exporting {model} to ONNX ({precision})")
    export_onnx(m, out, precision=precision, spec=spec, calib_images=calib)
    return out, spec



def export_triton(model, repo, *, weights=None, name: str | None = None, platform: str = "python",
                  precision: str = "fp32", max_batch: int = 8, instances: int = 1, image_input: str = "bytes",
                  threads: int = 0, queue_delay_us: int = 1000, thresh: float = 0.25, nms: float = 0.45,
                  calib=None, names=None, log=None) -> RepositoryInfo:
    """Write (or replace) NAME, NAME_pre, NAME_post, NAME_detect, NAME_detect_tensors in ``repo``.

    ``model``: a cfg (with ``weights``), a darkconv ``.onnx``, or (``platform="tensorrt"``) an
    engine with its sidecar. Each model folder is built in a temporary folder inside ``repo``
    and renamed into place, so a failed export leaves the repository as it was.
    """
    if platform not in PLATFORMS:
        raise ExportError(f"unknown platform {platform!r}: choose {', '.join(PLATFORMS)}")
    if image_input not in IMAGE_INPUTS:
        raise ExportError(f"unknown image input {image_input!r}: choose {', '.join(IMAGE_INPUTS)}")
    if max_batch < 1 or instances < 1:
        raise ExportError("--max-batch and --instances must be at least 1")
    name = name or Path(model).stem
    if not _NAME.match(name):
        raise ExportError(f"model name {name!r}: use letters, digits, '_', '-', '.' (max 128)")
    from ..pipeline import model_kind

    is_engine = model_kind(model) == "engine"
    if platform == "tensorrt" and not is_engine:
        from .tensorrt import require_tensorrt
        require_tensorrt()  # before any work: the engine is built for this GPU
    if is_engine and platform != "tensorrt":
        raise ExportError("a TensorRT engine goes with --platform tensorrt", file=str(model))
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".darkconv-export-", dir=repo))
    try:
        if is_engine:
            from .tensorrt import read_sidecar

            side = read_sidecar(model)
            spec = ModelSpec.from_dict(side["spec"]) if "spec" in side else None
            if spec is None:
                raise ExportError("the engine's sidecar has no darkconv spec", file=str(model))
            onnx_path = None
        else:
            onnx_path, spec = _source_onnx(model, weights, work, precision, calib, names, log)
        actual = side.get("precision", precision) if is_engine else \
            (onnx_precision(onnx_path) if model_kind(model) == "onnx" else precision)
        spec = dataclasses.replace(spec, source={**spec.source, "precision": actual})
        input_dims, head_dims = None, None
        if onnx_path is not None:
            (_, input_dims), head_dims, dyn = io_shapes(onnx_path)
            if not dyn:
                raise ExportError("this ONNX has a fixed batch: convert with --batch dynamic for a served model",
                                  file=str(onnx_path))
        staged = {}
        # the network
        d = work / name
        (d / "1").mkdir(parents=True)
        if platform == "tensorrt":
            engine = d / "1" / "model.plan"
            if is_engine:
                shutil.copyfile(model, engine)
            else:
                from .tensorrt import build_engine
                build_engine(onnx_path, engine, spec, precision, batch=(1, max(1, max_batch // 2), max_batch),
                             log=log)
        else:
            shutil.copyfile(onnx_path, d / "1" / "model.onnx")
            if platform == "python":
                (d / "1" / "model.py").write_text(_SHIM.format(cls="OnnxModel"))
        write_config(d / "config.pbtxt", model_config(name, spec, platform, max_batch=max_batch, instances=instances,
                                                      input_dims=input_dims, outputs=head_dims,
                                                      queue_delay_us=queue_delay_us, threads=threads))
        staged[name] = d
        for suffix, cls, cfg in (
                ("_pre", "PreprocessModel", pre_config(f"{name}_pre", spec, image_input=image_input,
                                                       max_batch=max_batch, instances=instances)),
                ("_post", "PostprocessModel", post_config(f"{name}_post", spec, max_batch=max_batch,
                                                          instances=instances, thresh=thresh, nms=nms,
                                                          head_dims=head_dims))):
            d = work / (name + suffix)
            (d / "1").mkdir(parents=True)
            (d / "1" / "model.py").write_text(_SHIM.format(cls=cls))
            write_config(d / "config.pbtxt", cfg)
            staged[name + suffix] = d
        for suffix, encoded in (("_detect", True), ("_detect_tensors", False)):
            d = work / (name + suffix)
            (d / "1").mkdir(parents=True)  # an ensemble has an empty version folder
            write_config(d / "config.pbtxt", ensemble_config(name + suffix, name, spec, encoded=encoded,
                                                             image_input=image_input, max_batch=max_batch,
                                                             input_dims=input_dims, head_dims=head_dims))
            staged[name + suffix] = d
        validate_repository(work, list(staged))
        for m, d in staged.items():  # into place, one folder at a time
            dest = repo / m
            if dest.exists():
                old = work / f".old-{m}"
                os.replace(dest, old)
            os.replace(d, dest)
        return RepositoryInfo(repo, name, platform, list(staged), spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
