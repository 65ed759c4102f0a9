"""The ``darkconv`` command line: convert, detect, parity, bench, demo.

Errors from darkconv (bad cfg, wrong weights, missing backend, unreadable image)
are printed as one line naming the file/line/layer and the fix, with a non-zero exit.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import DarkconvError

PRECISIONS = ("fp32", "fp16", "int8")


def _die(msg: str, code: int = 1):
    click.echo(f"darkconv: error: {msg}", err=True)
    sys.exit(code)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except DarkconvError as e:
            _die(str(e), e.exit_code)
        except KeyboardInterrupt:
            _die("interrupted", 130)
    return wrapper


def progress(**kw):
    from tqdm import tqdm

    return functools.partial(tqdm, file=sys.stderr, disable=None, dynamic_ncols=True, **kw)


def parse_size(value):
    if value is None:
        return None, None
    try:
        w, _, h = value.lower().partition("x")
        w, h = int(w), int(h or w)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected WxH, e.g. 416x416") from None
    if w % 32 or h % 32 or w <= 0 or h <= 0:
        raise click.BadParameter(f"{value!r}: width and height must be positive multiples of 32")
    return w, h


def parse_batch(value: str):
    """'dynamic' | 'N' | 'MIN:OPT:MAX' -> (onnx batch, (min, opt, max))."""
    v = value.strip().lower()
    if v == "dynamic":
        return "dynamic", (1, 1, 1)
    try:
        parts = [int(p) for p in v.split(":")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected dynamic, N or MIN:OPT:MAX") from None
    if len(parts) == 1 and parts[0] > 0:
        return parts[0], (parts[0],) * 3
    if len(parts) == 3 and 0 < parts[0] <= parts[1] <= parts[2]:
        return "dynamic", tuple(parts)
    raise click.BadParameter(f"{value!r}: expected dynamic, N or MIN:OPT:MAX with 0 < MIN <= OPT <= MAX")


def split_model_args(args, need_inputs=True):
    """MODEL [WEIGHTS] INPUTS...: a cfg is followed by its .weights when one is given."""
    args = list(args)
    if not args:
        raise click.UsageError("missing MODEL")
    model, weights = args.pop(0), None
    if Path(model).suffix.lower() == ".cfg" and args and Path(args[0]).suffix.lower() == ".weights":
        weights = args.pop(0)
    if not Path(model).exists():
        raise DarkconvError("no such file", file=model)
    if need_inputs and not args:
        raise click.UsageError("missing IMAGE_OR_DIR")
    return model, weights, args


class DarkconvGroup(click.Group):
    """Click group whose usage errors are one line like every other darkconv error."""

    def main(self, *args, **kwargs):
        standalone = kwargs.pop("standalone_mode", True)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            if not standalone:
                raise
            hint = f" (see: darkconv {e.ctx.command_path.split(' ', 1)[1]} --help)" \
                if getattr(e, "ctx", None) and " " in e.ctx.command_path else " (see: darkconv --help)"
            click.echo(f"darkconv: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("darkconv: error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=DarkconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="darkconv")
def main():
    """Darknet YOLO models (.cfg + .weights) on PyTorch, ONNX Runtime and TensorRT, with Darknet's numbers."""


# -- convert --------------------------------------------------------------------------------
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
@handle_errors
def convert(cfg, weights, output, precision, calib, calib_method, int8_target, size, batch, opset, names,
            engine, workspace, timing_cache):
    """Convert a Darknet CFG + WEIGHTS to ONNX (FP32/FP16/INT8 Q/DQ), and optionally a TensorRT engine."""
    import darkconv
    from .export.onnx import export_onnx
    from .pipeline import resolve_names
    from .zoo import sha256

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
    for out in [output] + ([Path(engine)] if engine else []):
        if not out.resolve().parent.is_dir():
            raise DarkconvError(f"the folder {out.parent} does not exist", file=str(out))
    if engine:
        from .export.tensorrt import require_tensorrt
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
        from .parity import int8_report
        click.echo(int8_report(model, output, spec, list(calib), progress=progress(desc="INT8 vs FP32", unit="img")))
    if engine:
        from .export.tensorrt import build_engine
        build_engine(output, engine, spec, precision, batch=profile, workspace_gb=workspace,
                     timing_cache=timing_cache, source=spec.source, log=click.echo)
        click.echo(f"wrote {engine} and {engine}.json")


# -- detect ---------------------------------------------------------------------------------
@main.command()
@click.argument("args", nargs=-1, required=True)
@click.option("--backend", default=None, help="torch | onnxruntime | tensorrt | opencv [default: from MODEL]")
@click.option("--thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--nms", type=click.FloatRange(0, 1), default=0.45, show_default=True, help="NMS threshold (0 disables)")
@click.option("--letterbox/--no-letterbox", default=None, help="override the cfg's letter_box")
@click.option("--names", type=click.Path(exists=True, dir_okay=False), help="class names file")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="write annotated images here")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write Darknet's -out JSON here")
@click.option("--agnostic", is_flag=True, help="class-agnostic NMS (Darknet: per class)")
@click.option("--max-det", type=click.IntRange(1), default=None, help="keep at most N (box, class) pairs per image")
@click.option("--size", help="network input WxH (cfg models)")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads [default: all cores]")
@handle_errors
def detect(args, backend, thresh, nms, letterbox, names, out_dir, json_path, agnostic, max_det, size, batch,
           threads):
    """Detect objects: detect MODEL.cfg [MODEL.weights] IMAGE_OR_DIR...  |  detect MODEL.onnx|ENGINE IMAGE_OR_DIR..."""
    from .detect import expand_inputs, run_detect
    from .pipeline import model_kind, open_runner, resolve_names

    model, weights, inputs = split_model_args(args)
    if not expand_inputs(inputs):
        _die("no images found in " + ", ".join(inputs), 2)
    if size and model_kind(model) != "cfg":
        raise click.BadParameter("an .onnx or engine has a fixed input size; --size applies to cfg models",
                                 param_hint="--size")
    if Path(model).suffix.lower() == ".cfg" and weights is None:
        raise DarkconvError("detect needs the .weights after the cfg (random weights detect nothing useful): "
                            "darkconv detect MODEL.cfg MODEL.weights IMAGES...", file=model)
    width, height = parse_size(size)
    runner = open_runner(model, weights, backend, threads=threads, width=width, height=height, log=click.echo)
    with runner:
        class_names = resolve_names(runner.spec, names)
        results, t = run_detect(runner, inputs, class_names, thresh=thresh, nms=nms, letterbox=letterbox,
                                agnostic=agnostic, max_det=max_det, out_dir=out_dir, json_path=json_path,
                                batch=batch, progress=progress(desc="detect", unit="img") if len(inputs) > 1 or
                                Path(inputs[0]).is_dir() else None)
        where = runner.describe()  # while active: it names the session's provider / device
    failed = [r for r in results if r.error]
    n = max(t.images, 1)
    click.echo(f"{t.images} image(s) on {where}: per image decode {t.decode / n * 1e3:.1f} ms, "
               f"preprocess {t.preprocess / n * 1e3:.1f} ms, inference {t.inference / n * 1e3:.1f} ms, "
               f"postprocess {t.postprocess / n * 1e3:.2f} ms")
    if out_dir:
        click.echo(f"annotated images in {out_dir}/")
    if json_path:
        click.echo(f"wrote {json_path}")
    if failed:
        _die(f"{len(failed)} of {len(results)} image(s) could not be read", 2)


# -- parity ---------------------------------------------------------------------------------
@main.command()
@click.argument("cfg", type=click.Path(exists=True, dir_okay=False))
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              help="comma list; the first is the reference (opencv = OpenCV DNN as an independent check)")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="precision of the exported backends (torch and opencv stay FP32)")
@click.option("--images", multiple=True, type=click.Path(exists=True),
              help="images or directories [default: darkconv's bundled sample images]")
@click.option("--thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--nms", type=click.FloatRange(0, 1), default=0.45, show_default=True)
@click.option("--size", help="network input WxH")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--tol-head", type=float, default=None, help="max relative head error [default per precision]")
@click.option("--tol-score", type=float, default=None, help="max |Δscore| [default per precision]")
@click.option("--threads", type=click.IntRange(1), default=None)
@handle_errors
def parity(cfg, weights, backends, precision, images, thresh, nms, size, batch, tol_head, tol_score, threads):
    """Run the same images through several backends and compare heads and detections."""
    import tempfile

    from .parity import load_images, run_parity
    from .pipeline import DATA, open_runner
    from .runners import canonical

    width, height = parse_size(size)
    names = [b.strip() for b in backends.split(",") if b.strip()]
    if len(names) < 2:
        raise click.BadParameter("give at least two backends", param_hint="--backends")
    imgs, files = load_images(images or [DATA])
    runners, precisions = [], []
    with tempfile.TemporaryDirectory(prefix="darkconv-parity-") as tmp:
        for b in names:
            b = canonical(b)
            p = precision if b == "onnxruntime" else "fp32"
            r = open_runner(cfg, weights, b, threads=threads, width=width, height=height, precision=p,
                            calib=files if p == "int8" else None, workdir=tmp)
            runners.append(r)
            precisions.append(p)
        for r in runners:
            r.activate()
        try:
            report = run_parity(runners, imgs, precisions=precisions, thresh=thresh, nms=nms,
                                tol_head=tol_head, tol_score=tol_score, batch=batch, log=click.echo)
        finally:
            for r in runners:
                r.deactivate()
    click.echo(f"\n{report.images} image(s), reference {report.reference}:\n" + report.table())
    if not report.ok:
        _die("backends disagree beyond tolerance (see table)", 1)


# -- demo -----------------------------------------------------------------------------------
@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="darkconv-demo", show_default=True)
@click.option("--threads", type=int, default=None)
@handle_errors
def demo(out_dir, threads):
    """The bundled default model end to end: fetch yolov3-tiny (COCO), convert to ONNX, detect on sample images."""
    from .detect import run_detect
    from .pipeline import DATA, open_runner, resolve_names
    from .zoo import default_model

    files = default_model(log=click.echo)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "yolov3-tiny.onnx"
    # click fills every other option of convert with its default
    click.get_current_context().invoke(convert, cfg=str(files.cfg), weights=str(files.weights),
                                       output=str(onnx_path), names=str(files.names))
    with open_runner(onnx_path, threads=threads) as runner:
        names = resolve_names(runner.spec)
        results, t = run_detect(runner, [DATA], names, out_dir=out / "predictions",
                                json_path=out / "result.json")
    click.echo(f"annotated images in {out / 'predictions'}/, Darknet JSON in {out / 'result.json'}")


# -- bench ----------------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("weights", required=False, type=click.Path(dir_okay=False))
@click.option("--backend", default=None,
              help="torch | onnxruntime (ort) | tensorrt (trt) | opencv [default: from MODEL]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="cfg models: exported precision [default: fp32]; an .onnx/engine runs its own")
@click.option("--batch", "batches", default="1", show_default=True, help="batch sizes, comma separated: 1,4,8")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="untimed calls per batch size")
@click.option("--iters", type=click.IntRange(1), default=None, help="timed calls per batch size")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), default=None,
              help="time each batch size for this long (at least 3 calls) [default: 3 s unless --iters]")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads [default: all cores]")
@click.option("--size", help="network input WxH (cfg models)")
@click.option("--e2e", multiple=True, type=click.Path(exists=True),
              help="images or directories: also time decode / preprocess / inference / postprocess per image "
                   "(repeatable; also the INT8 calibration set)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write every figure + the environment")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="write a PNG (name must end in .png): latency vs batch, pipeline split")
@handle_errors
def bench(model, weights, backend, precision, batches, warmup, iters, seconds, threads, size, e2e, json_path,
          plot_path):
    """Latency / throughput of MODEL(.cfg [WEIGHTS] | .onnx | engine) on one backend, per batch size.

    A cfg without WEIGHTS runs on random weights (speed only). Load / export / session
    creation are timed apart from inference. Ctrl-C prints what was measured so far.
    """
    from . import bench as bm

    if iters is not None and seconds is not None:
        raise click.UsageError("give --iters or --seconds, not both")
    try:
        batch_list = bm.parse_batches(batches)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--batch") from None
    width, height = parse_size(size)
    if plot_path and Path(plot_path).suffix.lower() != ".png":
        raise click.BadParameter(f"{plot_path}: the plot is a PNG, name it *.png", param_hint="--plot")
    prep = bm.prepare(model, weights, backend, precision=precision, width=width, height=height, threads=threads,
                      calib=list(e2e) or None, max_batch=max(batch_list), log=click.echo)
    try:
        result = bm.run_bench(prep, batch_list, warmup=warmup, iters=iters, seconds=seconds, e2e=list(e2e) or None,
                              progress=progress(unit="it", leave=False), log=click.echo,
                              settings={"threads_requested": threads})
    finally:
        prep.cleanup()
    click.echo(bm.format_report(result))
    if json_path:
        bm.write_json(result, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        bm.plot(result, plot_path)
        click.echo(f"wrote {plot_path}")
    if result["interrupted"]:
        _die("interrupted (partial results above)", 130)
    if result["results"] and all(r.get("error") for r in result["results"]):
        _die("no batch size could be measured (see the errors above)", 1)


if __name__ == "__main__":  # pragma: no cover
    main()
