#!/usr/bin/env python3
"""Mutation check of the TensorRT tests: seed one bug at a time into darkconv/runners/tensorrt.py or
darkconv/export/tensorrt.py and assert that tests/test_tensorrt.py (against tests/fake_trt) fails.

Each mutation is applied to a temporary copy of the darkconv package that is put first on sys.path;
the TensorRT tests then run in this process (pytest.main, modules purged between runs so each run
imports the mutated copy). A mutation that leaves every test green is reported and makes the exit
status 1. The original sources are never modified.

    python3 scripts/trt_mutations.py            # table of mutations and the first test that caught each
    python3 scripts/trt_mutations.py --quiet    # only failures
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import shutil
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER, EXPORT = "darkconv/runners/tensorrt.py", "darkconv/export/tensorrt.py"

# (name, file, exact source text, replacement): each text must occur exactly once
MUTATIONS = [
    ("drop the stream synchronize after the output copies", RUNNER,
     '        _check_cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")\n', ""),
    ("skip set_input_shape before enqueue (infer)", RUNNER,
     "        if not ctx.set_input_shape(INPUT_NAME, x.shape):\n", "        if False:\n"),
    ("skip set_input_shape when sizing buffers (activate)", RUNNER,
     "        if not self._context.set_input_shape(INPUT_NAME, max_shape):\n", "        if False:\n"),
    ("swap the two output buffers' device addresses", RUNNER,
     "            if not ctx.set_tensor_address(name, buf.device):\n",
     "            _sw = dict(zip(self._outputs, self._outputs[::-1]))\n"
     "            if not ctx.set_tensor_address(name, self._buffers[_sw.get(name, name)].device):\n"),
    ("swap the two outputs' device->host copies", RUNNER,
     "            _check_cuda(cudart.cudaMemcpyAsync(buf.host_ptr, buf.device, count * buf.dtype.itemsize, d2h,\n",
     "            _o = self._buffers[self._outputs[::-1][self._outputs.index(name)]]\n"
     "            _check_cuda(cudart.cudaMemcpyAsync(buf.host_ptr, _o.device, count * buf.dtype.itemsize, d2h,\n"),
    ("drop set_tensor_address (all tensors)", RUNNER,
     "            if not ctx.set_tensor_address(name, buf.device):\n",
     "            if False:\n"),
    ("set_tensor_address for the input only", RUNNER,
     "            if not ctx.set_tensor_address(name, buf.device):\n",
     "            if name == INPUT_NAME and not ctx.set_tensor_address(name, buf.device):\n"),
    ("copy the input to the device before writing the pinned buffer", RUNNER,
     "        inp.host[:x.size] = x.ravel()\n"
     "        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost\n"
     "        _check_cuda(cudart.cudaMemcpyAsync(inp.device, inp.host_ptr, x.nbytes, h2d, self._stream),\n"
     "                    \"cudaMemcpyAsync (input)\")\n",
     "        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost\n"
     "        _check_cuda(cudart.cudaMemcpyAsync(inp.device, inp.host_ptr, x.nbytes, h2d, self._stream),\n"
     "                    \"cudaMemcpyAsync (input)\")\n"
     "        inp.host[:x.size] = x.ravel()\n"),
    ("copy back elements, not bytes", RUNNER,
     "buf.host_ptr, buf.device, count * buf.dtype.itemsize, d2h,", "buf.host_ptr, buf.device, count, d2h,"),
    ("pass the stream object, not its int handle, to execute_async_v3", RUNNER,
     "ctx.execute_async_v3(int(self._stream))", "ctx.execute_async_v3(self._stream)"),
    ("use the removed execute_async_v2", RUNNER,
     "ctx.execute_async_v3(int(self._stream))", "ctx.execute_async_v2([], int(self._stream))"),
    ("profile given as (max, opt, min)", EXPORT,
     "profile.set_shape(INPUT_NAME, (b[0], *chw), (b[1], *chw), (b[2], *chw))",
     "profile.set_shape(INPUT_NAME, (b[2], *chw), (b[1], *chw), (b[0], *chw))"),
    ("profile given as (min, max, opt)", EXPORT,
     "profile.set_shape(INPUT_NAME, (b[0], *chw), (b[1], *chw), (b[2], *chw))",
     "profile.set_shape(INPUT_NAME, (b[0], *chw), (b[2], *chw), (b[1], *chw))"),
    ("STRONGLY_TYPED passed as a value, not a bit", EXPORT,
     "flags |= 1 << int(strongly_typed)", "flags |= int(strongly_typed)"),
    ("no STRONGLY_TYPED flag", EXPORT,
     "    if strongly_typed is not None:  # 10.x", "    if False:  # 10.x"),
    ("set_timing_cache called with a keyword the bindings do not have", EXPORT,
     "config.set_timing_cache(cache, ignore_mismatch=False)", "config.set_timing_cache(cache, ignore=False)"),
    ("FP16 builder flag set (removed in 11)", EXPORT,
     "    config = builder.create_builder_config()\n",
     "    config = builder.create_builder_config()\n    config.set_flag(trt.BuilderFlag.FP16)\n"),
]

TEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider", "tests/test_tensorrt.py",
             "-k", "not mutations and not real_engine"]


def _purge():
    for name in list(sys.modules):
        if name == "darkconv" or name.startswith(("darkconv.", "fake_trt")) or name in ("test_tensorrt",
                                                                                        "conftest"):
            del sys.modules[name]
    importlib.invalidate_caches()


def run_tests(pkg_root: Path) -> tuple[int, str, float]:
    """pytest on the TensorRT tests with ``pkg_root/darkconv`` imported; (exit code, output, seconds)."""
    import pytest

    _purge()
    sys.path.insert(0, str(pkg_root))
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with redirect_stdout(out), redirect_stderr(out):
            code = pytest.main(TEST_ARGS)
        import darkconv
        where = Path(darkconv.__file__).resolve()
        assert str(where).startswith(str(pkg_root.resolve())), f"tests imported {where}, not the mutated copy"
    finally:
        sys.path.remove(str(pkg_root))
        _purge()
    return int(code), out.getvalue(), time.perf_counter() - t0


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("FAILED ") or line.startswith("ERROR "):
            return line.split(" ", 1)[1].split(" - ")[0].replace("tests/test_tensorrt.py::", "")
    return "(see output)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    sys.dont_write_bytecode = True
    os.chdir(ROOT)
    rows, survived = [], []
    with tempfile.TemporaryDirectory() as t:
        pkg = Path(t)
        shutil.copytree(ROOT / "darkconv", pkg / "darkconv", ignore=shutil.ignore_patterns("__pycache__"))
        code, out, secs = run_tests(pkg)
        if code != 0:
            print(out[-3000:])
            print("baseline: the TensorRT tests fail without any mutation", file=sys.stderr)
            return 2
        rows.append(("(none: baseline)", "passed", "", secs))
        for name, rel, old, new in MUTATIONS:
            src = (ROOT / rel).read_text()
            if src.count(old) != 1:
                print(f"mutation {name!r}: its source text occurs {src.count(old)} times in {rel}; update "
                      f"scripts/trt_mutations.py", file=sys.stderr)
                return 2
            (pkg / rel).write_text(src.replace(old, new))
            try:
                code, out, secs = run_tests(pkg)
            finally:
                (pkg / rel).write_text(src)
            caught = code != 0
            rows.append((name, "caught" if caught else "SURVIVED", first_failure(out) if caught else "", secs))
            if not caught:
                survived.append(name)
    if not args.quiet or survived:
        w = max(len(r[0]) for r in rows)
        print(f"{'mutation':<{w}}  result    first failing test (s)")
        for name, res, test, secs in rows:
            print(f"{name:<{w}}  {res:<8}  {test} ({secs:.1f})")
    if survived:
        print(f"{len(survived)} mutation(s) survived: {survived}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
