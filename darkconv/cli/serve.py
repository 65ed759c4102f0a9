"""``darkconv serve``: a real Triton Inference Server on darkconv models, until Ctrl-C / SIGTERM."""
from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

import click

from ..errors import DarkconvError
from .common import handle_errors, main


def _models(args) -> tuple[list[Path], list[tuple[str, str | None]]]:
    """Repository folders as given, and (model, weights) pairs to export."""
    repos, todo = [], []
    args = list(args)
    while args:
        a = args.pop(0)
        p = Path(a)
        if p.is_dir():
            if not any(p.glob("*/config.pbtxt")):
                raise DarkconvError("not a Triton model repository (no */config.pbtxt)", file=a)
            repos.append(p)
        elif not p.is_file():
            raise DarkconvError("no such file or folder", file=a)
        elif p.suffix.lower() == ".cfg":
            w = args.pop(0) if args and Path(args[0]).suffix.lower() == ".weights" else None
            todo.append((a, w))
        elif p.suffix.lower() == ".onnx":
            todo.append((a, None))
        else:
            raise DarkconvError("serve takes a repository folder, a cfg (+ weights) or a darkconv .onnx", file=a)
    return repos, todo


@main.command()
@click.argument("models", nargs=-1)
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface, for a fleet behind a load balancer)")
@click.option("--repo", "out_repo", type=click.Path(file_okay=False),
              help="write the repository exported from cfg/onnx MODELs here [default: a temporary folder]")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True)
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads per instance (0: all cores)")
@click.option("--timeout", type=click.FloatRange(1), default=180, show_default=True,
              help="seconds to wait for the server to be ready")
@click.option("--install", is_flag=True, help="only fetch the bundled server (once) and exit")
@handle_errors
def serve(models, http_port, grpc_port, metrics_port, host, out_repo, max_batch, instances, threads, timeout,
          install):
    """Serve MODEL... (repository folders, cfg [+ weights], .onnx) on a real Triton Inference Server.

    The server is the tritonserver binary from the nvidia-pytriton wheel (python backend; fetched
    once, sha256-checked). A cfg/onnx is exported on the fly (--platform python, --image-input
    uint8). Waits until the server is ready, then serves until Ctrl-C or SIGTERM.
    """
    from ..export.triton import export_triton
    from ..serve import TritonServer, install_server

    if install:
        click.echo(f"Triton server in {install_server(log=click.echo)}")
        return
    if not models:
        raise click.UsageError("missing MODEL (a repository folder, a cfg [+ weights] or an .onnx)")
    repos, todo = _models(models)
    tmp = None
    if todo:
        if out_repo is None:
            tmp = tempfile.TemporaryDirectory(prefix="darkconv-repo-")
        target = Path(out_repo or tmp.name)
        for model, weights in todo:
            info = export_triton(model, target, weights=weights, platform="python", image_input="uint8",
                                 max_batch=max_batch, instances=instances, threads=threads, log=click.echo)
            click.echo(f"exported {model} -> {', '.join(info.models)} in {target}")
        repos.append(target)
    server = TritonServer(repos, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, host=host,
                          log=click.echo)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        t0 = time.monotonic()
        server.start(timeout=timeout)
        click.echo(f"Triton ready in {time.monotonic() - t0:.1f} s: http://{host}:{http_port}, grpc://{host}:{grpc_port}"
                   f", metrics http://{host}:{metrics_port}/metrics (log: {server.log_path}); Ctrl-C stops")
        while stop["signal"] is None and server.alive():
            time.sleep(0.2)
        if stop["signal"] is None:
            raise DarkconvError(f"the Triton server exited ({server.proc.returncode}): {server.failure()} "
                                f"(log: {server.log_path})")
        click.echo("stopping the Triton server")
        code = server.stop()
        click.echo(f"Triton server stopped ({code})")
        server.close()  # a clean stop: the log goes too
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if tmp is not None:
            tmp.cleanup()
