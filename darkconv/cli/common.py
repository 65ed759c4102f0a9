"""Shared pieces of the ``darkconv`` command line: the group, one-line errors, option parsers, progress bars.

Errors from darkconv (bad cfg, wrong weights, missing backend, unreadable image)
are printed as one line naming the file/line/layer and the fix, with a non-zero exit.
Each command lives in its own module of this package and registers itself on :data:`main`.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import DarkconvError

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
            sys.exit(130)


@click.group(cls=DarkconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="darkconv")
def main():
    """Darknet YOLO models (.cfg + .weights) on PyTorch, ONNX Runtime and TensorRT, with Darknet's numbers."""

