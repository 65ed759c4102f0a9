"""The INT8 recipes (how a model is quantized for a target) and which one each CPU class gets.

Pure data and small functions (no onnx, no onnxruntime), so that a runner can warn about a model's recipe
without importing the exporter (``export/quantize.py`` applies the recipes). The CPU classes come from
``darkconv.cpu``; ONNX Runtime's U8S8 saturation without VNNI: "Quantize ONNX Models", onnxruntime.ai.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ExportError

RECIPE_KEY = "darkconv.int8.recipe"


@dataclass(frozen=True)
class Recipe:
    """One way to quantize: data types, weight range, granularity, where Q/DQ pairs go."""

    name: str
    target: str                 # "onnxruntime" | "tensorrt"
    activations: str            # "u8" | "s8"
    weights: str                # "s8" | "u8"
    reduce_range: bool          # 7-bit weights (ONNX Runtime's answer to U8S8 saturation without VNNI)
    per_channel: bool
    placement: str              # "between" | "tensorrt" | "conv-inputs"
    summary: str

    @property
    def symmetric_activations(self) -> bool:
        return self.target == "tensorrt"

    @property
    def saturates_without_vnni(self) -> bool:
        """True when ONNX Runtime on x86-64 without VNNI runs this through VPMADDUBSW with 8-bit weights
        (S8 activations are shifted to U8 on x86, so S8S8 is affected too; U8U8 is not)."""
        return self.weights == "s8" and not self.reduce_range

    def as_dict(self) -> dict:
        return {"name": self.name, "target": self.target, "activations": self.activations, "weights": self.weights,
                "reduce_range": self.reduce_range, "per_channel": self.per_channel, "placement": self.placement}


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("u8s8-rr", "onnxruntime", "u8", "s8", True, True, "between",
           "U8S8 QDQ with 7-bit weights (reduce_range), activations quantized between layers"),
    Recipe("u8s8", "onnxruntime", "u8", "s8", False, True, "between",
           "U8S8 QDQ, 8-bit weights, activations quantized between layers"),
    Recipe("s8s8", "onnxruntime", "s8", "s8", False, True, "between",
           "S8S8 QDQ (ONNX Runtime's default), activations quantized between layers"),
    Recipe("s8s8-rr", "onnxruntime", "s8", "s8", True, True, "between",
           "S8S8 QDQ with 7-bit weights, activations quantized between layers"),
    Recipe("u8u8", "onnxruntime", "u8", "u8", False, True, "between",
           "U8U8 QDQ (no VPMADDUBSW saturation), activations quantized between layers"),
    Recipe("u8s8-rr-pt", "onnxruntime", "u8", "s8", True, False, "between",
           "as u8s8-rr but per-tensor weights"),
    Recipe("tensorrt", "tensorrt", "s8", "s8", False, True, "tensorrt",
           "symmetric S8S8, zero points 0, float bias; Q/DQ on Conv inputs and on MaxPool / Concat / "
           "residual-Add inputs (TensorRT's placement rules)"),
    Recipe("tensorrt-conv", "tensorrt", "s8", "s8", False, True, "conv-inputs",
           "symmetric S8S8, Q/DQ on Conv inputs only (darkconv <= 0.x's tensorrt target)"),
)}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ExportError(f"unknown INT8 recipe {name!r}: choose {', '.join(RECIPES)}")
    return RECIPES[name]


#: per CPU class: (recipe, why, measured here?) for the onnxruntime target
CPU_RECIPES = {
    "x86-novnni": ("u8s8-rr", "x86-64 without VNNI: U8S8 with 8-bit weights saturates in VPMADDUBSW; 7-bit "
                              "weights do not, and held-out agreement and latency were measured on such a CPU "
                              "(AMD EPYC, AVX2, benchmarks/results/bench_int8.md)", True),
    "x86-vnni": ("u8s8", "x86-64 with VNNI: U8S8 sums are 32-bit (VPDPBUSD), no saturation, so full 8-bit weights; "
                         "as on an AMX Xeon with AMX denied to ONNX Runtime (benchmarks/no_amx.py), measured on an AMD "
                         "EPYC with AVX-512 VNNI and no AMX (KVM, family 26): held-out agreement 1.000 on yolov3-tiny "
                         "and yolov4-tiny-10, the fastest recipe (0.61x/0.47x FP32; u8s8-rr, the same kernels, "
                         "0.65x/0.48x), benchmarks/results/bench_int8-x86-vnni.md; CPUs with only AVX-VNNI (256-bit "
                         "kernels) inferred from the same instruction", True),
    "x86-amx": ("u8s8", "x86-64 with AMX-INT8 and AVX-512 VNNI: U8S8 with 8-bit weights keeps held-out agreement "
                        "1.000 on yolov3-tiny and yolov4-tiny-10 with the lowest head error, at the best latency "
                        "(tied with u8s8-rr, same kernels: 0.57x/0.52x FP32; ONNX Runtime runs U8S8 GEMMs on AMX, "
                        "but its signed-weight QLinearConv kernels are AVX-512 VNNI: results identical with AMX "
                        "denied); measured on an Intel Xeon (KVM, avx512_vnni, avx_vnni, amx_int8), "
                        "benchmarks/results/bench_int8-x86-amx.md", True),
    "arm": ("s8s8", "ARM64: no saturation per ONNX Runtime's documentation, which recommends S8S8 QDQ first "
                    "(inferred, not measured by darkconv)", False),
    "unknown": ("u8s8-rr", "CPU features unknown: 7-bit weights are safe on every CPU (at a small accuracy cost "
                           "where VNNI would have allowed 8 bits)", False),
}


def choose_recipe(target: str, cpu=None) -> tuple[Recipe, str]:
    """The recipe for ``target`` on ``cpu`` (default: this machine) and a one-sentence reason."""
    if target == "tensorrt":
        return RECIPES["tensorrt"], ("TensorRT's ONNX parser needs symmetric S8S8 with zero points 0 and a float "
                                     "bias; Q/DQ placed so INT8 flows conv to conv (engine effect inferred, "
                                     "not measured: no TensorRT here)")
    if target != "onnxruntime":
        raise ExportError(f"unknown INT8 target {target!r}: choose tensorrt or onnxruntime")
    if cpu is None:
        from .cpu import cpu_info
        cpu = cpu_info()
    name, why, _ = CPU_RECIPES[cpu.cpu_class]
    return RECIPES[name], f"{why}; this CPU: {cpu.describe()}"


def saturation_warning(meta: dict, cpu) -> str | None:
    """A one-line warning when a model's recipe (from its metadata) is known to saturate on ``cpu``."""
    if cpu.cpu_class not in ("x86-novnni", "unknown") or cpu.arch not in ("x86_64", "amd64"):
        return None
    name = meta.get(RECIPE_KEY)
    if name is None and meta.get("darkconv.precision") == "int8-onnxruntime":
        name = "u8s8"  # darkconv before recipes: U8S8, 8-bit weights
    r = RECIPES.get(name or "")
    if r is None or r.target != "onnxruntime" or not r.saturates_without_vnni:
        return None
    return (f"INT8 recipe {r.name} (8-bit weights) saturates on this CPU (x86-64 without VNNI: VPMADDUBSW) and may "
            f"lose detections; reconvert here with `darkconv convert --precision int8` (it picks u8s8-rr)")
