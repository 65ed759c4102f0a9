"""``darkconv demo``: the bundled default model end to end."""
from __future__ import annotations

from pathlib import Path

import click

from .common import handle_errors, main
from .convert import convert

@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="darkconv-demo", show_default=True)
@click.option("--threads", type=int, default=None)
@handle_errors
def demo(out_dir, threads):
    """The bundled default model end to end: fetch yolov3-tiny (COCO), convert to ONNX, detect on sample images."""
    from ..detect import run_detect
    from ..pipeline import DATA, open_runner, resolve_names
    from ..zoo import default_model

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
