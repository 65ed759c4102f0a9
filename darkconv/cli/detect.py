"""``darkconv detect``: detections on images, videos, streams or a camera; drawn, and as Darknet's JSON."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click

from ..errors import DarkconvError
from .common import (EXIT_SIGINT, EXIT_SIGTERM, _die, check_device, device_option, handle_errors, lanes_option, main,
                     parse_size, split_model_args, strict_option, url_option)

MAX_PRINT_HELP = "name at most N boxes per image/frame on stdout, then '... and K more' (--json has them all)"


@main.command()
@click.argument("args", nargs=-1, required=True)
@click.option("--backend", default=None,
              help="torch | onnxruntime | tensorrt | opencv | triton [default: from MODEL]")
@click.option("--thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--nms", type=click.FloatRange(0, 1), default=0.45, show_default=True, help="NMS threshold (0 disables)")
@click.option("--letterbox/--no-letterbox", default=None, help="override the cfg's letter_box")
@click.option("--names", type=click.Path(exists=True, dir_okay=False), help="class names file")
@click.option("--out", "out", type=click.Path(), metavar="DIR|VIDEO",
              help="images: write the annotated images into this folder (each keeps its name and format); "
                   "a video, stream or camera: write the annotated video here (.mp4, .avi, .mkv, .mov; same size, "
                   "same fps)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="write Darknet's -out JSON here (one entry per image/frame, with frame_id)")
@click.option("--every", type=click.IntRange(1), default=1, show_default=True,
              help="take every N-th frame of a video (or N-th image); the annotated video plays at fps/N")
@click.option("--max-frames", type=click.IntRange(1), default=None, help="stop after N frames (or images)")
@click.option("--all-frames", is_flag=True,
              help="streams and cameras: detect on every frame even when slower than the source (default: skip the "
                   "frames that arrive while the detector is busy, as Darknet's demo does)")
@click.option("--agnostic", is_flag=True, help="class-agnostic NMS (Darknet: per class)")
@click.option("--max-det", type=click.IntRange(1), default=None, help="keep at most N (box, class) pairs per image")
@click.option("--print-max", type=click.IntRange(0), default=20, show_default=True, metavar="N", help=MAX_PRINT_HELP)
@click.option("-q", "--quiet", is_flag=True, help="no line per image/frame (errors and the summary still print)")
@click.option("--random-weights", is_flag=True,
              help="a cfg without .weights: deterministic random weights, for structure and speed checks on any cfg "
                   "(every output says so; the detections mean nothing)")
@click.option("--size", help="network input WxH, multiples of 32, e.g. 416x416 or 608 (cfg models)")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads [default: all cores]")
@lanes_option
@url_option
@device_option
@strict_option
@handle_errors
def detect(args, backend, thresh, nms, letterbox, names, out, json_path, every, max_frames, all_frames, agnostic,
           max_det, print_max, quiet, random_weights, size, batch, threads, lanes, url, device):
    """Detect objects on images, a video, a stream or a camera.

    \b
    darkconv detect MODEL.cfg MODEL.weights IMAGE_OR_DIR_OR_LIST...
    darkconv detect MODEL.onnx|ENGINE video.mp4 --out annotated.mp4 --json frames.json
    darkconv detect MODEL.onnx rtsp://camera/stream --out rec.mp4     (http(s)://, udp://, ... too)
    darkconv detect MODEL.onnx 0                                      (camera 0, /dev/video0)

    One line per image/frame (at most --print-max boxes named), a live fps figure (a progress bar on a
    terminal, a status line every few seconds otherwise) and a summary. Ctrl-C finishes the annotated
    video and the JSON with the frames so far.
    """
    from ..detect import Detect, Interrupted

    served = bool(url) or (backend or "").lower() == "triton"
    model, weights, inputs = split_model_args(args, served=served)
    width, height = parse_size(size, "--size")
    if device is not None:
        from ..pipeline import resolve_backend
        check_device(device, [resolve_backend(model, backend, url=served)])
    job = Detect(model, weights, inputs, backend=backend, out=out, json_path=json_path, every=every,
                 max_frames=max_frames, live=False if all_frames else None, random_weights=random_weights,
                 width=width, height=height, served=served)
    try:
        report, where = job.run(threads=threads, lanes=lanes, url=url, device=device, names=names, thresh=thresh, nms=nms, letterbox=letterbox,
                                agnostic=agnostic, max_det=max_det, batch=batch, print_max=print_max, quiet=quiet,
                                log=click.echo)
    except Interrupted as e:
        for line in job.summary(e.report, job.where):
            click.echo(line, err=line.startswith("darkconv: warning:"))
        code = EXIT_SIGTERM if e.signal_name == "SIGTERM" else EXIT_SIGINT
        what = "; ".join(p for p in e.report.written if p.startswith("wrote")) or "nothing was written"
        _die(f"{'terminated (SIGTERM)' if code == EXIT_SIGTERM else 'interrupted'} after {e.report.frames} "
             f"frame(s): {what} (complete files with the frames so far)", code)
    for line in job.summary(report, where):
        click.echo(line, err=line.startswith("darkconv: warning:"))
    if report.failed_counts:
        unread = [r for r in report.failed if r.failed_stage != "inference"]
        gone = [r for r in report.failed if r.failed_stage == "inference"]
        n_gone = report.failed_counts.get("inference", 0)
        n_unread = sum(report.failed_counts.values()) - n_gone
        n = report.frames

        def names_of(rs, count):
            return ", ".join(r.name for r in rs[:10]) + (" ..." if count > 10 else "")
        unit = "image(s)" if report.kind == "images" else "frame(s)"
        parts = ([f"{n_unread} of {n} {unit} could not be read ({names_of(unread, n_unread)})"] if n_unread else []) + \
            ([f"{n_gone} of {n} {unit} failed in inference ({names_of(gone, n_gone)})"] if n_gone else [])
        _die("; ".join(parts), 2)
