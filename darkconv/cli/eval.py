"""``darkconv eval``: Darknet's ``detector map``, COCO metrics, and agreement between backends / precisions."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import DarkconvError
from .common import (PRECISIONS, handle_errors, lanes_option, main, parse_size, progress, split_model_args,
                     strict_option, url_option)


def _out_path(value, what, suffix=None):
    if value is None:
        return None
    p = Path(value)
    if suffix and p.suffix.lower() != suffix:
        raise click.BadParameter(f"{value}: the {what} is a {suffix[1:].upper()}, name it *{suffix}",
                                 param_hint=f"--{what}")
    if not p.resolve().parent.is_dir():
        raise DarkconvError(f"the folder {p.parent} does not exist", file=str(p))
    return p


@main.command("eval")
@click.argument("args", nargs=-1)
@click.option("--demo", is_flag=True,
              help="evaluate the bundled default model (COCO yolov3-tiny) on darkconv's hand-labelled sample images "
                   "(darkconv/data/samples.data); no MODEL or DATA then")
@click.option("--backend", default=None, help="torch | onnxruntime (ort) | tensorrt (trt) | opencv [default: from MODEL]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="cfg models on onnxruntime: the exported precision [default: fp32]; an .onnx/engine runs its own")
@click.option("--calib", multiple=True, type=click.Path(exists=True),
              help="INT8 of a cfg: calibration images or folders (repeatable); also used by an INT8 --ref")
@click.option("--ref", default=None, metavar="BACKEND[:PRECISION]",
              help="agreement mode: this run's detections (score > --ref-thresh) are the truths, e.g. torch, "
                   "onnxruntime:fp32; DATA may then be any images")
@click.option("--ref-model", type=click.Path(exists=True, dir_okay=False),
              help="the reference runs this model (e.g. the cfg behind an .onnx or engine) [default: MODEL]")
@click.option("--ref-weights", type=click.Path(exists=True, dir_okay=False), help="weights of --ref-model")
@click.option("--ref-thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="score above which a reference detection is a truth")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="the image folder of a COCO annotations JSON")
@click.option("--iou-thresh", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="IoU a detection must exceed to match a truth (Darknet's -iou_thresh)")
@click.option("--points", type=click.Choice(["0", "11", "101"]), default="0", show_default=True,
              help="AP: 0 = area under the PR curve (Darknet's default), 11 (VOC2007), 101 (COCO-style)")
@click.option("--thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="confidence for precision / recall / F1 / TP / FP / FN / average IoU (Darknet's -thresh)")
@click.option("--letterbox/--no-letterbox", default=None, help="override the cfg's letter_box")
@click.option("--names", type=click.Path(exists=True, dir_okay=False), help="class names file")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="write every figure, the environment and the model hashes here")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="write per-class PR curves and AP bars here (name must end in .png)")
@click.option("--coco-json", "coco_json", type=click.Path(dir_okay=False),
              help="write the detections as Darknet's `detector valid` COCO results file")
@click.option("--no-coco", is_flag=True, help="skip the COCO metrics")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads [default: all cores]")
@lanes_option
@click.option("--size", help="network input WxH (cfg models)")
@click.option("--limit", type=click.IntRange(1), default=None, help="evaluate only the first N images")
@url_option
@strict_option
@handle_errors
def eval_(args, demo, backend, precision, calib, ref, ref_model, ref_weights, ref_thresh, images_dir, iou_thresh, points, thresh, letterbox,
          names, json_path, plot_path, coco_json, no_coco, batch, threads, lanes, size, limit, url):
    """Darknet-exact mAP, COCO AP and agreement:  eval MODEL [WEIGHTS] DATA

    \b
    DATA is a Darknet .data file (valid= list, names=, YOLO label files found as Darknet finds them),
    a COCO annotations JSON with --images DIR, or images (folders, files, .txt lists) with their YOLO
    label files beside them; with --ref, any images (the reference run's detections are the truths).
    MODEL is a cfg (+ weights), a darkconv .onnx or a TensorRT engine.
    """
    from ..eval import evaluate, format_coco, format_summary, plot, write_json

    if demo:
        if args:
            raise click.UsageError("--demo evaluates the bundled model and data: give no MODEL or DATA")
        from ..pipeline import DATA
        from ..zoo import default_model

        files = default_model(log=click.echo)
        model, weights, data = str(files.cfg), str(files.weights), [str(DATA / "samples.data")]
    else:
        if not args:
            raise click.UsageError("missing MODEL and DATA (or use --demo)")
        served = bool(url) or (backend or "").lower() == "triton"
        model, weights, data = split_model_args(args, need_inputs=False, served=served)
        if not data:
            raise click.UsageError("missing DATA: a .data file, a COCO annotations JSON (with --images), or images "
                                   "with --ref")
    if Path(model).suffix.lower() == ".cfg" and weights is None and not (url or (backend or "").lower() == "triton"):
        raise DarkconvError("eval needs the .weights after the cfg (random weights detect nothing): "
                            "darkconv eval MODEL.cfg MODEL.weights DATA", file=model)
    if (ref_model or ref_weights) and not ref:
        raise click.UsageError("--ref-model goes with --ref BACKEND[:PRECISION]")
    if ref_model and Path(ref_model).suffix.lower() == ".cfg" and not ref_weights:
        raise DarkconvError("--ref-model CFG needs --ref-weights", file=ref_model)
    width, height = parse_size(size)
    json_path = _out_path(json_path, "json")
    plot_path = _out_path(plot_path, "plot", ".png")
    coco_json = _out_path(coco_json, "coco-json")
    result = evaluate(model, weights, data, images=images_dir, backend=backend, precision=precision,
                      calib=list(calib) or None, ref=ref, ref_thresh=ref_thresh, iou_thresh=iou_thresh,
                      points=int(points), thresh=thresh, letterbox=letterbox, names=names, batch=batch,
                      threads=threads, size=(width, height) if width else None, ref_model=ref_model,
                      ref_weights=ref_weights, url=url, coco=not no_coco,
                      coco_json=coco_json, limit=limit, lanes=lanes, progress=progress(desc="eval", unit="img"), log=click.echo)
    click.echo("")
    click.echo(result.map.darknet_report())
    if result.coco:
        click.echo("")
        click.echo(format_coco(result))
    click.echo("")
    click.echo(format_summary(result))
    if coco_json:
        click.echo(f"wrote {coco_json}")
    if json_path:
        write_json(result, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path)
        click.echo(f"wrote {plot_path}")
