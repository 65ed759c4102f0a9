"""Shared pieces of the ``darkconv`` command line: the group, one-line errors, option parsers, progress bars.

Errors from darkconv (bad cfg, wrong weights, missing backend, unreadable image)
are printed as one line naming the file/line/layer and the fix, with a non-zero exit.
Warnings (e.g. a cfg key Darknet ignores) are one ``darkconv: warning: ...`` line each.
SIGTERM is handled like Ctrl-C: temp files are removed and the command exits with one line
(exit code 143 for SIGTERM, 130 for SIGINT).
Each command lives in its own module of this package and registers itself on :data:`main`.
"""
from __future__ import annotations

import functools
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from .. import __version__
from ..errors import DarkconvError, DarkconvWarning

PRECISIONS = ("fp32", "fp16", "int8")
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that it unwinds like Ctrl-C (temp files removed)."""


def _one_line(msg: str, limit: int = 400) -> str:
    """The promise is one line: a multi-line message (e.g. a library's backtrace) is joined and cut."""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    text = " | ".join(lines) if lines else "unknown error"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _die(msg: str, code: int = 1):
    click.echo(f"darkconv: error: {_one_line(msg)}", err=True)
    sys.exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    if issubclass(category, DarkconvWarning):
        click.echo(f"darkconv: warning: {_one_line(message)}", err=True)
    else:
        _default(message, category, filename, lineno, file, line)


def _raise_terminated(signum, frame):
    raise Terminated()


def handle_errors(fn):
    """Run a command: DarkconvError -> one line + its exit code; Ctrl-C / SIGTERM -> one line, 130 / 143;
    darkconv warnings printed as one line each."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        main_thread = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", DarkconvWarning)
                warnings.showwarning = _show_warning
                return fn(*a, **k)
        except DarkconvError as e:
            _die(str(e), e.exit_code)
        except Terminated:
            _die("terminated (SIGTERM); nothing half-written was left", EXIT_SIGTERM)
        except KeyboardInterrupt:
            _die("interrupted", EXIT_SIGINT)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
    return wrapper


def strict_option(fn):
    """``--strict`` for a command that reads a cfg: keys Darknet does not read are errors, not warnings.

    One line per command: put ``@strict_option`` between the click options and ``@handle_errors``;
    the command function does not see the flag (it sets the process default for ``darkconv.load``).
    """
    from ..darknet.keys import strict_keys

    @click.option("--strict", is_flag=True,
                  help="treat cfg keys Darknet does not read (typos such as activaton=) as errors, not warnings")
    @functools.wraps(fn)
    def wrapper(*a, strict=False, **k):
        with strict_keys(strict):
            return fn(*a, **k)
    return wrapper


def device_option(fn):
    """``--device cpu|cuda|cuda:N`` for the torch backend (bench, parity, detect); the syntax is checked
    while parsing, the GPU by :func:`check_device` before any work."""
    def parse(ctx, param, value):
        from ..runners.torch import parse_device
        try:
            return parse_device(value)
        except DarkconvError as e:
            raise click.BadParameter(str(e)) from None

    from ..runners.torch import DEVICE_HELP
    return click.option("--device", default=None, callback=parse, metavar="cpu|cuda|cuda:N",
                        help=f"where the torch backend runs: {DEVICE_HELP}")(fn)


def check_device(device, backends) -> None:
    """Before any work: ``--device`` only with a torch backend, and CUDA only where PyTorch sees a GPU
    (one-line error naming the fix, exit 3)."""
    if device is None:
        return
    if "torch" not in backends:
        raise click.BadParameter(f"--device applies to the torch backend, not {', '.join(backends)} "
                                 f"(onnxruntime runs on the CPU; a TensorRT engine runs on its GPU)",
                                 param_hint="--device")
    if device.startswith("cuda"):
        from ..runners.torch import resolve_device
        resolve_device(device)


def progress(**kw):
    from tqdm import tqdm

    return functools.partial(tqdm, file=sys.stderr, disable=None, dynamic_ncols=True, **kw)


def parse_size(value, option: str = "--size"):
    """'WxH' or 'N' -> (w, h), both positive multiples of 32; a bad value names ``option`` and the form."""
    if value is None:
        return None, None
    try:
        w, _, h = value.lower().partition("x")
        w, h = int(w), int(h or w)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected WxH (or one number for a square), e.g. 416x416 or 608",
                                 param_hint=f"'{option}'") from None
    if w % 32 or h % 32 or w <= 0 or h <= 0:
        raise click.BadParameter(f"{value!r}: width and height must be positive multiples of 32 (WxH, e.g. "
                                 f"{max(32, round(w / 32) * 32)}x{max(32, round(h / 32) * 32)})",
                                 param_hint=f"'{option}'")
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


def lanes_option(fn):
    """``--lanes N``: onnxruntime inference calls at once (see :func:`darkconv.pipeline.default_lanes`)."""
    return click.option("--lanes", type=click.IntRange(1), default=None, metavar="N",
                        help="onnxruntime: run N batches at once on one session of threads/N intra-op threads: "
                             "more images per second on files, more latency per image [default: one single-threaded "
                             "lane per CPU thread on machines with up to 4 (for images, video files, and streams "
                             "with --all-frames); 1 for live streams, cameras, more threads and other backends]")(fn)


def url_option(fn):
    """``--url HOST:PORT[,HOST:PORT...]``: run on Triton server(s) (implies ``--backend triton``)."""
    return click.option("--url", default=None, metavar="HOST:PORT[,...]",
                        help="Triton server(s) serving MODEL (a served model name, or a cfg/onnx standing for its "
                             "stem): requests spread over them, a failed one is retried on another; implies "
                             "--backend triton. http:// or grpc:// (port 8001: gRPC) [default: HTTP]")(fn)


def split_model_args(args, need_inputs=True, served=False):
    """MODEL [WEIGHTS] INPUTS...: a cfg is followed by its .weights when one is given.

    ``served``: MODEL may name a model on a Triton server (no file needed).
    """
    args = list(args)
    if not args:
        raise click.UsageError("missing MODEL")
    model, weights = args.pop(0), None
    if Path(model).suffix.lower() == ".cfg" and args and Path(args[0]).suffix.lower() == ".weights":
        weights = args.pop(0)
    if not served and not Path(model).exists():
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
            sys.exit(EXIT_SIGINT)


@click.group(cls=DarkconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="darkconv")
def main():
    """Darknet YOLO models (.cfg + .weights) on PyTorch, ONNX Runtime and TensorRT, with Darknet's numbers."""

