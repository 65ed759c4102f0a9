"""``darkconv convert``: Darknet cfg + weights to ONNX (FP32/FP16/INT8) and TensorRT engines."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import DarkconvError
from ..io import check_output_path
from .common import PRECISIONS, handle_errors, main, parse_batch, parse_size, progress, strict_option

@main.command()
@click.argument("cfg", type=click.Path(dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="ONNX path [default: CFG name + precision]")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--calib", multiple=True, type=click.Path(exists=True),
              help="INT8 calibration images: a directory, image files or a .txt list (repeatable)")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="percentile",
              show_default=True, help="percentile (99.999%) clips rare outliers: best on yolov3-tiny; "
                                      "entropy, with ONNX Runtime's 128-bin histogram, equals minmax on small sets")
@click.option("--int8-target", type=click.Choice(["tensorrt", "onnxruntime"]), default="tensorrt",
              show_default=True, help="tensorrt: symmetric S8S8 Q/DQ the TensorRT parser accepts; "
                                      "onnxruntime: U8S8, faster on x86 CPUs")
@click.option("--size", help="network input WxH [default: the cfg's width/height]")
@click.option("--batch", default="dynamic", show_default=True,
              help="ONNX batch: dynamic, N, or MIN:OPT:MAX (dynamic ONNX; with --engine the TensorRT profile). "
                   "An engine built with 'dynamic' takes batch 1 only")
@click.option("--opset", type=click.IntRange(18, 21), default=18, show_default=True,
              help="ONNX opset (TensorRT engines: 18 or 19)")
@click.option("--names", type=click.Path(exists=True, dir_okay=False), help="class names to embed")
@click.option("--engine", type=click.Path(dir_okay=False), help="also build a TensorRT engine here")
@click.option("--workspace", type=float, default=4.0, show_default=True, help="TensorRT workspace (GB)")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read+written)")
@strict_option
@handle_errors
def convert(cfg, weights, output, precision, calib, calib_method, int8_target, size, batch, opset, names,
            engine, workspace, timing_cache):
    """Convert a Darknet CFG + WEIGHTS to ONNX (FP32/FP16/INT8 Q/DQ), and optionally a TensorRT engine."""
    import darkconv
    from ..export.onnx import export_onnx
    from ..pipeline import resolve_names
    from ..zoo import sha256

    width, height = parse_size(size)
    onnx_batch, profile = parse_batch(batch)
    if precision == "int8" and not calib:
        raise click.UsageError("--precision int8 needs --calib DIR (images like the ones you will run on)")
    if engine and opset > 19:
        raise click.BadParameter("TensorRT engines are built from opset 18 or 19", param_hint="--opset")
    if calib and precision != "int8":
        raise click.BadParameter("calibration images are only used with --precision int8", param_hint="--calib")
    stem = Path(cfg).stem
    output = Path(output or f"{stem}{'' if precision == 'fp32' else '-' + precision}.onnx")
    outputs = [output] + ([Path(engine), Path(f"{engine}.json")] if engine else []) + \
        ([Path(timing_cache)] if timing_cache else [])
    inputs = {Path(p).resolve() for p in (cfg, weights, names) if p}
    for out in outputs:  # before any work: a bad output path fails in milliseconds, not after the export
        check_output_path(out)
        if out.resolve() in inputs:
            raise DarkconvError("is one of the inputs: writing it would destroy it; give another output path",
                                file=str(out))
    if engine:
        from ..export.tensorrt import require_tensorrt
        require_tensorrt()  # fail before writing anything
    t0 = time.perf_counter()
    model = darkconv.load(cfg, weights, width=width, height=height)
    t1 = time.perf_counter()
    spec = model.spec
    spec = spec.with_names(resolve_names(spec, names)) if names else spec  # checks the count
    spec.source.update({"cfg_sha256": sha256(Path(cfg)), "weights_sha256": sha256(Path(weights))})
    click.echo(f"loaded {cfg} + {weights}: {len(model.layers)} layers, {model.count_floats():,} weights, "
               f"input {spec.width}x{spec.height}, heads {[h.grid for h in spec.heads]} ({t1 - t0:.2f} s)")
    pb = progress(desc="calibrating", unit="img") if precision == "int8" else None
    export_onnx(model, output, precision=precision, batch=onnx_batch, opset=opset, spec=spec,
                calib_images=list(calib) or None, calib_method=calib_method, int8_target=int8_target,
                progress=pb)
    t2 = time.perf_counter()
    click.echo(f"wrote {output} ({precision}, {output.stat().st_size / 1e6:.1f} MB) in {t2 - t1:.2f} s")
    if precision == "int8":
        from ..parity import int8_report
        click.echo(int8_report(model, output, spec, list(calib), progress=progress(desc="INT8 vs FP32", unit="img")))
    if engine:
        from ..export.tensorrt import build_engine
        build_engine(output, engine, spec, precision, batch=profile, workspace_gb=workspace,
                     timing_cache=timing_cache, source=spec.source, log=click.echo)
        click.echo(f"wrote {engine} and {engine}.json")
