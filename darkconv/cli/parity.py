"""``darkconv parity``: the same images through several backends, compared."""
from __future__ import annotations

import click

from .common import (PRECISIONS, _die, check_device, device_option, handle_errors, main, parse_size, strict_option,
                     url_option)

@main.command()
@click.argument("cfg", type=click.Path(exists=True, dir_okay=False))
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              help="comma list; the first is the reference (opencv = OpenCV DNN as an independent check; "
                   "triton = the model served at --url)")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="precision of the exported backends (torch and opencv stay FP32)")
@click.option("--images", multiple=True, type=click.Path(exists=True),
              help="images or directories [default: darkconv's bundled sample images]")
@click.option("--calib", multiple=True, type=click.Path(exists=True),
              help="INT8 calibration images, never the judged ones [default: darkconv's zoo photos "
                   "(scikit-image and matplotlib sample photographs, fetched once)]")
@click.option("--thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--nms", type=click.FloatRange(0, 1), default=0.45, show_default=True)
@click.option("--size", help="network input WxH")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--tol-head", type=float, default=None, help="max relative head error [default per precision]")
@click.option("--tol-score", type=float, default=None, help="max |Δscore| [default per precision]")
@click.option("--threads", type=click.IntRange(1), default=None)
@url_option
@device_option
@strict_option
@handle_errors
def parity(cfg, weights, backends, precision, images, calib, thresh, nms, size, batch, tol_head, tol_score, threads,
           url, device):
    """Run the same images through several backends and compare heads and detections."""
    import tempfile

    from ..parity import load_images, run_parity
    from ..pipeline import DATA, open_runner
    from ..runners import canonical

    width, height = parse_size(size)
    names = [b.strip() for b in backends.split(",") if b.strip()]
    if len(names) < 2:
        raise click.BadParameter("give at least two backends", param_hint="--backends")
    check_device(device, [canonical(b) for b in names])  # torch runners run there (FP32: the reference)
    imgs, files = load_images(images or [DATA])
    calib_files = held_out_calibration(calib, files) if precision == "int8" else None
    runners, precisions = [], []
    with tempfile.TemporaryDirectory(prefix="darkconv-parity-") as tmp:
        for b in names:
            b = canonical(b)
            p = precision if b == "onnxruntime" else "fp32"
            if b == "triton":
                r = open_runner(cfg, weights, b, width=width, height=height, url=url)
                p = r.spec.source.get("precision", "fp32")
            else:
                r = open_runner(cfg, weights, b, threads=threads, width=width, height=height, precision=p,
                                calib=calib_files if p == "int8" else None, workdir=tmp,
                                device=device if b == "torch" else None)
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


def held_out_calibration(calib, judged: list[str]) -> list[str]:
    """INT8 calibration images that are not among the judged ones (held-out parity)."""
    from pathlib import Path

    from ..errors import DarkconvError
    from ..preprocess import list_images

    if calib:
        files = [str(p) for p in list_images(list(calib))]
    else:
        from .. import zoo
        try:
            files = [str(p) for p in zoo.fetch_images("photos", log=lambda m: click.echo(m, err=True))]
        except DarkconvError as e:
            raise DarkconvError(f"{e} (or pass --calib DIR with images other than the judged ones)") from None
    judged_set = {Path(f).resolve() for f in judged}
    held_out = [f for f in files if Path(f).resolve() not in judged_set]
    if not held_out:
        raise DarkconvError("--calib gives only images that are also judged: INT8 parity calibrates on other "
                            "images than it judges; pass a different --calib DIR")
    return held_out
