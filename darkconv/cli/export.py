"""``darkconv export``: a model laid out for a serving system (``darkconv export triton``)."""
from __future__ import annotations

import click

from .common import PRECISIONS, handle_errors, main, split_model_args


@main.group()
def export():
    """Export a model for a serving system: darkconv export triton MODEL [WEIGHTS] --repo DIR."""


@export.command("triton")
@click.argument("args", nargs=-1, required=True)
@click.option("--repo", required=True, type=click.Path(file_okay=False), help="model repository folder (created)")
@click.option("--name", help="served model name [default: MODEL's file stem]")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="cfg models: exported precision (int8 needs --calib); an .onnx keeps its own")
@click.option("--calib", multiple=True, type=click.Path(exists=True), help="INT8 calibration images (repeatable)")
@click.option("--platform", type=click.Choice(["onnxruntime", "tensorrt", "python"]), default="onnxruntime",
              show_default=True,
              help="onnxruntime_onnx or tensorrt_plan (NGC's Triton), or python: the ONNX on ONNX Runtime inside a "
                   "python-backend model (servers without an onnxruntime backend, like `darkconv serve`)")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="max_batch_size; dynamic batching prefers MAX/2 and MAX")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="instance_group count of each model")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="python platform: ONNX Runtime intra-op threads per instance (0: all cores)")
@click.option("--queue-delay-us", type=click.IntRange(0), default=1000, show_default=True,
              help="dynamic batching max_queue_delay_microseconds")
@click.option("--image-input", type=click.Choice(["bytes", "uint8"]), default="bytes", show_default=True,
              help="how NAME_detect takes encoded images: TYPE_STRING (one file per row), or TYPE_UINT8 rows "
                   "of file bytes (what the bundled `darkconv serve` server can read under numpy 2)")
@click.option("--thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="NAME_post default score threshold (a request parameter 'thresh' overrides it)")
@click.option("--nms", type=click.FloatRange(0, 1), default=0.45, show_default=True,
              help="NAME_post default NMS threshold (request parameter 'nms')")
@click.option("--names", type=click.Path(exists=True, dir_okay=False), help="class names to embed (cfg models)")
@handle_errors
def triton(args, repo, name, precision, calib, platform, max_batch, instances, threads, queue_delay_us,
           image_input, thresh, nms, names):
    """A Triton model repository: MODEL.cfg MODEL.weights | MODEL.onnx | ENGINE (--platform tensorrt).

    Writes NAME (the network: raw heads), NAME_pre (Darknet-exact decode + resize), NAME_post
    (darkconv's postprocessor), and the ensembles NAME_detect (encoded images -> detections) and
    NAME_detect_tensors (preprocessed images + sizes -> detections). Every config.pbtxt is checked
    against Triton's ModelConfig schema.
    """
    from ..export.triton import export_triton

    model, weights, rest = split_model_args(args, need_inputs=False)
    if rest:
        raise click.UsageError(f"unexpected arguments: {' '.join(rest)}")
    if precision == "int8" and not calib:
        raise click.UsageError("--precision int8 needs --calib DIR")
    info = export_triton(model, repo, weights=weights, name=name, platform=platform, precision=precision,
                         max_batch=max_batch, instances=instances, image_input=image_input, threads=threads,
                         queue_delay_us=queue_delay_us, thresh=thresh, nms=nms, calib=list(calib) or None,
                         names=names, log=click.echo)
    click.echo(f"wrote {', '.join(info.models)} in {info.repo}/ ({platform}); detections: infer "
               f"{info.detect_model} (input IMAGE), raw heads: {info.name}")
