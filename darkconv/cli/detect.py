"""``darkconv detect``: detections on images, drawn and as Darknet's JSON."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import DarkconvError
from .common import (_die, check_device, device_option, handle_errors, main, parse_size, progress,
                     split_model_args, strict_option, url_option)

@main.command()
@click.argument("args", nargs=-1, required=True)
@click.option("--backend", default=None,
              help="torch | onnxruntime | tensorrt | opencv | triton [default: from MODEL]")
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
@url_option
@device_option
@strict_option
@handle_errors
def detect(args, backend, thresh, nms, letterbox, names, out_dir, json_path, agnostic, max_det, size, batch,
           threads, url, device):
    """Detect objects: detect MODEL.cfg [MODEL.weights] IMAGE_OR_DIR...  |  detect MODEL.onnx|ENGINE IMAGE_OR_DIR..."""
    from ..detect import expand_inputs, run_detect
    from ..pipeline import model_kind, open_runner, resolve_names

    served = bool(url) or (backend or "").lower() == "triton"
    model, weights, inputs = split_model_args(args, served=served)
    if not expand_inputs(inputs):
        _die("no images found in " + ", ".join(inputs), 2)
    if size and model_kind(model) != "cfg":
        raise click.BadParameter("an .onnx or engine has a fixed input size; --size applies to cfg models",
                                 param_hint="--size")
    if Path(model).suffix.lower() == ".cfg" and weights is None and not served:
        raise DarkconvError("detect needs the .weights after the cfg (random weights detect nothing useful): "
                            "darkconv detect MODEL.cfg MODEL.weights IMAGES...", file=model)
    width, height = parse_size(size)
    if device is not None:
        from ..pipeline import default_backend
        from ..runners import canonical
        check_device(device, [canonical(backend or ("triton" if served else default_backend(model)))])
    runner = open_runner(model, weights, backend, threads=threads, width=width, height=height, log=click.echo,
                         url=url, device=device)
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
        unread = [r for r in failed if r.failed_stage != "inference"]
        gone = [r for r in failed if r.failed_stage == "inference"]

        def names_of(rs):
            return ", ".join(str(r.path) for r in rs[:10]) + (" ..." if len(rs) > 10 else "")
        parts = ([f"{len(unread)} of {len(results)} image(s) could not be read ({names_of(unread)})"] if unread else []) + \
            ([f"{len(gone)} of {len(results)} image(s) failed in inference ({names_of(gone)})"] if gone else [])
        _die("; ".join(parts), 2)
