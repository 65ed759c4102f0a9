"""``darkconv bench``: latency and throughput per backend and batch size."""
from __future__ import annotations

from pathlib import Path

import click

from ..io import check_output_path
from .common import (PRECISIONS, _die, check_device, device_option, handle_errors, main, parse_size, progress,
                     strict_option, url_option)

@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("weights", required=False, type=click.Path(dir_okay=False))
@click.option("--backend", default=None,
              help="torch | onnxruntime (ort) | tensorrt (trt) | opencv | triton [default: from MODEL]")
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
@click.option("--concurrency", default=None, help="also keep N requests in flight at once, comma separated: "
              "1,4,8 (threads in closed loops; for --backend triton)")
@url_option
@device_option
@click.option("--cuda-graphs", is_flag=True,
              help="torch on CUDA: record one CUDA graph per batch size and replay it (less launch overhead)")
@strict_option
@handle_errors
def bench(model, weights, backend, precision, batches, warmup, iters, seconds, threads, size, e2e, json_path,
          plot_path, concurrency, url, device, cuda_graphs):
    """Latency / throughput of MODEL(.cfg [WEIGHTS] | .onnx | engine) on one backend, per batch size.

    A cfg without WEIGHTS runs on random weights (speed only). Load / export / session
    creation are timed apart from inference. Ctrl-C prints what was measured so far.
    """
    from .. import bench as bm

    if iters is not None and seconds is not None:
        raise click.UsageError("give --iters or --seconds, not both")
    try:
        batch_list = bm.parse_batches(batches)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--batch") from None
    try:
        conc = bm.parse_batches(concurrency) if concurrency else None
    except ValueError as e:
        raise click.BadParameter(str(e).replace("batch sizes", "concurrency levels"), param_hint="--concurrency") \
            from None
    width, height = parse_size(size)
    if device is not None or cuda_graphs:
        from ..pipeline import resolve_backend
        chosen = resolve_backend(model, backend, url)
        check_device(device, [chosen])
        if cuda_graphs and (chosen != "torch" or (device or "cuda").startswith("cpu")):
            raise click.BadParameter("CUDA graphs are for the torch backend on --device cuda",
                                     param_hint="--cuda-graphs")
    if plot_path and Path(plot_path).suffix.lower() != ".png":
        raise click.BadParameter(f"{plot_path}: the plot is a PNG, name it *.png", param_hint="--plot")
    for out in (json_path, plot_path):  # before any work, not after minutes of timing
        if out:
            check_output_path(out)
    prep = bm.prepare(model, weights, backend, precision=precision, width=width, height=height, threads=threads,
                      calib=list(e2e) or None, max_batch=max(batch_list), log=click.echo, url=url,
                      device=device, cuda_graphs=cuda_graphs)
    try:
        result = bm.run_bench(prep, batch_list, warmup=warmup, iters=iters, seconds=seconds, e2e=list(e2e) or None,
                              progress=progress(unit="it", leave=False), log=click.echo,
                              settings={"threads_requested": threads, "concurrency": conc}, concurrency=conc)
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

