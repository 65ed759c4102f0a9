"""``darkconv convert``: Darknet cfg + weights to ONNX (FP32/FP16/INT8) and TensorRT engines."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import DarkconvError
from ..export.quantize import RECIPES as _RECIPES
from ..io import check_output_path
from ..preprocess import IMAGE_EXTS
from .common import PRECISIONS, handle_errors, main, parse_batch, parse_size, progress, strict_option

RECIPE_NAMES = tuple(_RECIPES)

@main.command()
@click.argument("cfg", type=click.Path(dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="ONNX path [default: CFG name + precision]")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--calib", multiple=True, type=click.Path(exists=True),
              help="INT8 calibration images: a directory, image files or a .txt list (repeatable)")
@click.option("--check", multiple=True, type=click.Path(exists=True),
              help="INT8 held-out images to judge agreement with FP32 on (repeatable) [default: every third "
                   "--calib image by name is held out and not used for calibration]")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="[default: percentile for onnxruntime, minmax for tensorrt: the best held-out agreement on "
                   "the real yolov3-tiny and yolov4-tiny-10; entropy (2048 bins) was never better and is ~15x slower]")
@click.option("--int8-target", type=click.Choice(["tensorrt", "onnxruntime"]), default=None,
              help="onnxruntime: the recipe this CPU runs accurately and fast (chosen from its features); "
                   "tensorrt: symmetric S8S8 Q/DQ for TensorRT's parser [default: tensorrt with --engine, "
                   "else onnxruntime]")
@click.option("--int8-recipe", type=click.Choice(sorted(RECIPE_NAMES)), default=None,
              help="override the recipe (see README, Precision)")
@click.option("--int8-budget", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="required held-out agreement with FP32 (e.g. 0.98): the most sensitive convs are left float "
                   "until it is met; if it cannot be met, nothing is written and the exit code is 1")
@click.option("--int8-report", type=click.Path(dir_okay=False),
              help="write the per-conv sensitivity report here (.md, or .json)")
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
def convert(cfg, weights, output, precision, calib, check, calib_method, int8_target, int8_recipe, int8_budget,
            int8_report, size, batch, opset, names, engine, workspace, timing_cache):
    """Convert a Darknet CFG + WEIGHTS to ONNX (FP32/FP16/INT8 Q/DQ), and optionally a TensorRT engine."""
    import darkconv
    from ..export.onnx import export_onnx
    from ..pipeline import resolve_names
    from ..io import sha256_file

    width, height = parse_size(size)
    onnx_batch, profile = parse_batch(batch)
    if precision == "int8" and not calib:
        raise click.UsageError("--precision int8 needs --calib DIR (images like the ones you will run on)")
    if engine and opset > 19:
        raise click.BadParameter("TensorRT engines are built from opset 18 or 19", param_hint="--opset")
    int8_opts = {"--check": check, "--calib-method": calib_method, "--int8-target": int8_target,
                 "--int8-recipe": int8_recipe, "--int8-budget": int8_budget, "--int8-report": int8_report}
    if precision != "int8":
        given = ["--calib"] * bool(calib) + [k for k, v in int8_opts.items() if v]
        if given:
            raise click.BadParameter("only used with --precision int8", param_hint=given[0])
    plan = plan_int8(calib, check, int8_target, int8_recipe, engine) if precision == "int8" else None
    stem = Path(cfg).stem
    output = Path(output or f"{stem}{'' if precision == 'fp32' else '-' + precision}.onnx")
    outputs = [output] + ([Path(engine), Path(f"{engine}.json")] if engine else []) + \
        ([Path(timing_cache)] if timing_cache else []) + ([Path(int8_report)] if int8_report else [])
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
    spec.source.update({"cfg_sha256": sha256_file(cfg), "weights_sha256": sha256_file(weights)})
    click.echo(f"loaded {cfg} + {weights}: {len(model.layers)} layers, {model.count_floats():,} weights, "
               f"input {spec.width}x{spec.height}, heads {[h.grid for h in spec.heads]} ({t1 - t0:.2f} s)")
    if plan is None:
        export_onnx(model, output, precision=precision, batch=onnx_batch, opset=opset, spec=spec)
    else:
        convert_int8_cli(model, spec, output, plan, onnx_batch, opset, calib_method, int8_budget, int8_report)
    t2 = time.perf_counter()
    click.echo(f"wrote {output} ({precision}, {output.stat().st_size / 1e6:.1f} MB) in {t2 - t1:.2f} s")
    if engine:
        from ..export.tensorrt import build_engine
        build_engine(output, engine, spec, precision, batch=profile, workspace_gb=workspace,
                     timing_cache=timing_cache, source=spec.source, log=click.echo)
        click.echo(f"wrote {engine} and {engine}.json")


def plan_int8(calib, check, target, recipe_name, engine) -> dict:
    """Check INT8 inputs before any model is loaded: images present, target/recipe/engine consistent."""
    from ..export.quantize import recipe
    from ..int8 import split_images
    from ..preprocess import list_images

    def files(paths, opt):
        out = list_images(list(paths))
        if not out:
            raise DarkconvError(f"{opt} {', '.join(map(str, paths))}: no images (expected "
                                f"{', '.join(sorted(IMAGE_EXTS))} files, a folder of them or a .txt list)")
        missing = [p for p in out if not Path(p).is_file()]
        if missing:
            raise DarkconvError(f"image listed in {opt} not found", file=str(missing[0]))
        return out

    r = recipe(recipe_name) if recipe_name else None
    target = target or (r.target if r else ("tensorrt" if engine else "onnxruntime"))
    if r is not None and r.target != target:
        raise click.BadParameter(f"recipe {r.name} is for {r.target}, not {target}", param_hint="--int8-recipe")
    if engine and target != "tensorrt":
        raise DarkconvError(f"--engine needs a TensorRT-compatible INT8 ONNX, but --int8-target {target} makes "
                            f"{(r or _RECIPES['u8s8-rr']).activations.upper()} activations with non-zero zero points "
                            "for ONNX Runtime: use --int8-target tensorrt (or drop --engine)")
    calib_files = files(calib, "--calib")
    if check:
        return {"target": target, "recipe": recipe_name, "calib": calib_files, "check": files(check, "--check"),
                "note": "--check"}
    calib_files, check_files = split_images(calib_files)
    return {"target": target, "recipe": recipe_name, "calib": calib_files, "check": check_files,
            "note": f"no --check: every third --calib image by name held out ({', '.join(Path(p).name for p in check_files[:6])}"
                    f"{', ...' if len(check_files) > 6 else ''}), {len(calib_files)} left to calibrate"}


def convert_int8_cli(model, spec, output, plan, onnx_batch, opset, method, budget, report):
    from ..io import atomic_write
    from ..export.onnx import to_onnx_model
    from ..int8 import Int8Error, convert_int8, fmt_agreement
    from ..int8_report import outcome_lines, write_report

    fp32 = to_onnx_model(model, batch=onnx_batch, opset=opset, spec=spec)
    q, out = convert_int8(model, fp32, spec, plan["calib"], plan["check"], method=method, target=plan["target"],
                          recipe_name=plan["recipe"], budget=budget, want_sensitivity=bool(report),
                          progress=progress(desc="INT8", unit="img"), log=click.echo)
    for line in outcome_lines(out, plan["note"]):
        click.echo(line)
    if report:
        write_report(report, out, Path(spec.source.get("cfg", "")).stem)
        click.echo(f"wrote {report} (layer sensitivity)")
    if budget is not None and not out.met:
        raise Int8Error(f"held-out agreement {fmt_agreement(out.agreement)} is below --int8-budget {budget} "
                        f"(with {len(out.float_layers)} conv(s) float); {output} was not written")
    atomic_write(output, [q.SerializeToString()])
