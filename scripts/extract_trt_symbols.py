#!/usr/bin/env python3
"""Extract the real TensorRT / cuda-python symbol and enum tables into tests/data/trt_symbols.json.

TensorRT cannot be installed here (its libraries come from an unreachable host), but
PyPI's ``tensorrt-cu12-bindings`` wheels hold the real compiled pybind11 module
(``tensorrt_bindings/tensorrt.so``). It links against libnvinfer / libnvonnxparser /
libnvinfer_plugin, yet only needs ten factory functions from them at load time
(``createInferBuilder_INTERNAL``, ``getPluginRegistry``, ... — see ``nm -D --undefined-only``).
This script compiles tiny stand-in libraries with those sonames that export those
functions (returning NULL, never called while importing), imports the real module,
and records what it declares: every top-level name, the members of the classes
darkconv touches, and every enum's names and integer values, the pybind11 signatures of the methods darkconv
calls (parameter names and types, from their docstrings), exactly as the real
bindings define them. Nothing here is typed in by hand.

cuda-python's ``cuda-bindings`` wheels import without a GPU; their runtime module's
``cuda*`` names and the enums darkconv uses are recorded the same way.

Usage (needs pip, gcc and network access to PyPI; not run by the tests):
    python3 scripts/extract_trt_symbols.py [--out tests/data/trt_symbols.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRT_VERSIONS = ("10.0.1", "10.13.3.9", "11.4.0.106")
CUDA_BINDINGS_VERSIONS = ("12.9.10", "13.5.0")

# classes whose members are recorded (what darkconv's builder/runner call, plus their neighbours)
TRT_CLASSES = ("Logger", "ILogger", "Builder", "IBuilderConfig", "INetworkDefinition", "OnnxParser", "ParserError",
               "IOptimizationProfile", "ITimingCache", "IHostMemory", "Runtime", "ICudaEngine", "IExecutionContext",
               "ITensor", "IInt8EntropyCalibrator2")
# pybind11 signatures (first docstring lines) recorded for these members: what darkconv and the fake call
SIGNATURES = {
    "Logger": ["__init__"], "Builder": ["__init__", "create_network", "create_builder_config",
                                        "create_optimization_profile", "build_serialized_network"],
    "IBuilderConfig": ["set_memory_pool_limit", "add_optimization_profile", "create_timing_cache", "set_timing_cache",
                       "get_timing_cache", "set_flag"],
    "IOptimizationProfile": ["set_shape", "get_shape"], "ITimingCache": ["serialize"],
    "OnnxParser": ["__init__", "parse_from_file", "parse", "get_error"], "ParserError": ["desc", "node_name",
                                                                                       "node_operator"],
    "INetworkDefinition": ["get_input", "get_output"], "Runtime": ["__init__", "deserialize_cuda_engine"],
    "ICudaEngine": ["get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape",
                    "get_tensor_profile_shape", "create_execution_context"],
    "IExecutionContext": ["set_input_shape", "get_tensor_shape", "set_tensor_address", "get_tensor_address",
                          "execute_async_v3"],
}
CUDA_ENUMS = ("cudaMemcpyKind", "cudaError_t", "cudaStreamCaptureStatus")

STUBS = {
    "libnvinfer.so.{M}": """
        void* createInferBuilder_INTERNAL(void* l, int v) { return 0; }
        void* createInferRefitter_INTERNAL(void* e, void* l, int v) { return 0; }
        void* createInferRuntime_INTERNAL(void* l, int v) { return 0; }
        void* getBuilderPluginRegistry(int c) { return 0; }
        void* getPluginRegistry(void) { return 0; }""",
    "libnvonnxparser.so.{M}": """
        void* createNvOnnxParser_INTERNAL(void* n, void* l, int v) { return 0; }
        void* createNvOnnxParserRefitter_INTERNAL(void* r, void* l, int v) { return 0; }
        int getNvOnnxParserVersion(void) { return 0; }""",
    "libnvinfer_plugin.so.{M}": """
        int initLibNvInferPlugins(void* l, const char* ns) { return 0; }""",
}

DUMP_TRT = r"""
import enum, inspect, json, re, sys
import tensorrt_bindings as t
classes = sys.argv[1].split(",")
sigs = json.loads(sys.argv[2])
def is_enum(o):
    return inspect.isclass(o) and hasattr(o, "__members__") and all(hasattr(v, "value") or isinstance(v, int)
                                                                       for v in o.__members__.values())
out = {"version": t.__version__, "module": sorted(n for n in dir(t) if not n.startswith("_")),
       "classes": {}, "enums": {}}
for n in out["module"]:
    o = getattr(t, n)
    if inspect.isclass(o) and hasattr(o, "__members__"):
        out["enums"][n] = {k: int(v) for k, v in o.__members__.items()}
for n in classes:
    if hasattr(t, n):
        out["classes"][n] = sorted(m for m in dir(getattr(t, n)) if not m.startswith("_"))
def signatures(fn):
    lines = [ln.strip() for ln in (getattr(fn, "__doc__", "") or "").splitlines()]
    found = [re.sub(r"^\d+\. ", "", ln) for ln in lines if re.match(r"^(\d+\. )?\w+\(self", ln)]
    return [re.sub(r"tensorrt_bindings\.tensorrt\.|typing\.|typing_extensions\.", "", f) for f in found]
out["signatures"] = {f"{c}.{m}": signatures(getattr(getattr(t, c), m))
                     for c, ms in sigs.items() if hasattr(t, c) for m in ms if hasattr(getattr(t, c), m)}
# nested enums darkconv uses (Logger.Severity is exposed as Logger.WARNING etc.)
out["enums"]["Logger.Severity"] = {k: int(getattr(t.Logger, k)) for k in ("INTERNAL_ERROR", "ERROR", "WARNING",
                                                                          "INFO", "VERBOSE")}
print(json.dumps(out))
"""

DUMP_CUDA = r"""
import json, sys
from cuda import bindings
from cuda.bindings import runtime as r
enums = sys.argv[1].split(",")
out = {"version": bindings.__version__,
       "runtime": sorted(n for n in dir(r) if n.startswith("cuda")),
       "enums": {e: {k: int(v) for k, v in getattr(r, e).__members__.items()} for e in enums}}
# what a call reports on a machine without a GPU/driver (this one)
err, count = r.cudaGetDeviceCount()
out["no_gpu"] = {"cudaGetDeviceCount": [err.name, count], "cudaMalloc": [r.cudaMalloc(16)[0].name],
                 "cudaStreamCreate": [r.cudaStreamCreate()[0].name]}
print(json.dumps(out))
"""


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def pip_download(spec: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", spec,
                    "-d", str(dest)], check=True)
    name = spec.split("==")[0].replace("-", "_")
    new = [p for p in dest.glob("*.whl") if p not in before] or sorted(dest.glob(f"{name}-{spec.split('==')[1]}*.whl"))
    if not new:
        raise SystemExit(f"pip downloaded nothing for {spec}")
    return new[0]


def build_stubs(major: str, where: Path) -> Path:
    d = where / f"stubs{major}"
    d.mkdir(parents=True, exist_ok=True)
    for soname, code in STUBS.items():
        soname = soname.format(M=major)
        src = d / (soname + ".c")
        src.write_text(code)
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / soname), f"-Wl,-soname,{soname}", str(src)],
                       check=True)
    return d


def extract_trt(version: str, tmp: Path) -> dict:
    whl = pip_download(f"tensorrt-cu12-bindings=={version}", tmp)
    root = tmp / f"trt-{version}"
    with zipfile.ZipFile(whl) as z:
        z.extractall(root)
    stubs = build_stubs(version.split(".")[0], tmp)
    env = dict(os.environ, LD_LIBRARY_PATH=str(stubs), PYTHONPATH=str(root))
    res = subprocess.run([sys.executable, "-c", DUMP_TRT, ",".join(TRT_CLASSES), json.dumps(SIGNATURES)], env=env,
                         cwd=root,
                         capture_output=True, text=True, check=True)
    d = json.loads(res.stdout)
    d["wheel"] = {"file": whl.name, "sha256": sha256(whl)}
    return d


def extract_cuda(version: str, tmp: Path) -> dict:
    whl = pip_download(f"cuda-bindings=={version}", tmp)
    path_whl = pip_download("cuda-pathfinder==1.9.1", tmp) if not list(tmp.glob("cuda_pathfinder-*.whl")) \
        else next(tmp.glob("cuda_pathfinder-*.whl"))
    root = tmp / f"cuda-{version}"
    for w in (whl, path_whl):
        with zipfile.ZipFile(w) as z:
            z.extractall(root)
    env = dict(os.environ, PYTHONPATH=str(root))
    res = subprocess.run([sys.executable, "-c", DUMP_CUDA, ",".join(CUDA_ENUMS)], env=env, cwd=root,
                         capture_output=True, text=True, check=True)
    d = json.loads(res.stdout)
    d["wheel"] = {"file": whl.name, "sha256": sha256(whl)}
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "trt_symbols.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        table = {
            "about": "extracted by scripts/extract_trt_symbols.py from the real PyPI wheels "
                     "(tensorrt-cu12-bindings: real pybind11 module imported with stand-in libnvinfer; "
                     "cuda-bindings: imported as is, no GPU)",
            "tensorrt": {v: extract_trt(v, tmp) for v in TRT_VERSIONS},
            "cuda_bindings": {v: extract_cuda(v, tmp) for v in CUDA_BINDINGS_VERSIONS},
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    tmp_out.replace(out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
