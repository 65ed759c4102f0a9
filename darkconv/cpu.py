"""The CPU's INT8-relevant features, read from the operating system (never guessed).

ONNX Runtime's INT8 kernels depend on them ("Quantize ONNX Models", onnxruntime.ai/docs/performance/
model-optimizations/quantization.html, "Data type selection" and FAQ): on x86-64 with AVX2 / AVX-512 but
without VNNI, U8S8 uses VPMADDUBSW, whose 16-bit intermediate sums can saturate; ``reduce_range`` (7-bit
weights) or U8U8 avoid it. "There is no such issue on other CPU architectures (x64 with VNNI and ARM)."

Sources: ``/proc/cpuinfo`` flags on Linux (x86 ``flags``, ARM ``Features``), ``sysctl`` on macOS. Anything
else is reported as unknown, and callers must treat unknown as "may saturate".
"""
from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache

#: flags that matter for INT8 (names as Linux prints them; macOS names are mapped onto these)
X86_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
ARM_FLAGS = ("asimddp", "i8mm")   # dot product (SDOT/UDOT), int8 matrix multiply (SMMLA)

CLASSES = {
    "x86-novnni": "x86-64 without VNNI (AVX2/AVX-512 only): U8S8 can saturate (VPMADDUBSW)",
    "x86-vnni": "x86-64 with VNNI (AVX-VNNI or AVX-512 VNNI): no U8S8 saturation",
    "x86-amx": "x86-64 with AMX-INT8 (and VNNI)",
    "arm": "ARM64: no U8S8 saturation (ONNX Runtime documentation)",
    "unknown": "CPU features could not be read",
}


@dataclass(frozen=True)
class CpuInfo:
    arch: str                      # "x86_64", "aarch64", ...
    model: str                     # e.g. "AMD EPYC"
    flags: frozenset = field(default_factory=frozenset)
    source: str = "unknown"        # where the flags came from

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def cpu_class(self) -> str:
        """One of :data:`CLASSES`."""
        if self.source == "unknown":
            return "unknown"
        if self.arch in ("x86_64", "amd64", "i386", "i686"):
            if "amx_int8" in self.flags:
                return "x86-amx"
            return "x86-vnni" if self.vnni else "x86-novnni"
        if self.arch in ("aarch64", "arm64"):
            return "arm"
        return "unknown"

    def relevant_flags(self) -> list[str]:
        return [f for f in X86_FLAGS + ARM_FLAGS if f in self.flags]

    def describe(self) -> str:
        flags = ", ".join(self.relevant_flags()) or "none of " + "/".join(X86_FLAGS[:4])
        return f"{self.model or self.arch} ({self.arch}; {flags}; from {self.source})"


def parse_cpuinfo(text: str, arch: str) -> CpuInfo:
    """Flags and model name from the text of ``/proc/cpuinfo`` (first processor)."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return CpuInfo(arch, model, frozenset(flags), "/proc/cpuinfo" if flags else "unknown")


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _macos(arch: str) -> CpuInfo:
    model = _sysctl("machdep.cpu.brand_string") or ""
    if arch == "arm64":
        flags = {"asimddp"} if _sysctl("hw.optional.arm.FEAT_DotProd") == "1" else set()
        if _sysctl("hw.optional.arm.FEAT_I8MM") == "1":
            flags.add("i8mm")
        return CpuInfo(arch, model, frozenset(flags), "sysctl")
    raw = " ".join(filter(None, (_sysctl("machdep.cpu.features"), _sysctl("machdep.cpu.leaf7_features")))).lower()
    if not raw:
        return CpuInfo(arch, model, frozenset(), "unknown")
    names = set(raw.split())
    flags = {f for f in ("avx2", "avx512f", "avx512bw") if f in names}
    if "avx512vnni" in names:
        flags.add("avx512_vnni")
    if "avxvnni" in names:
        flags.add("avx_vnni")
    return CpuInfo(arch, model, frozenset(flags), "sysctl")


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached). Never raises: unreadable features give ``source='unknown'``."""
    arch = platform.machine().lower() or "unknown"
    system = platform.system()
    if system == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                return parse_cpuinfo(f.read(), arch)
        except OSError:
            return CpuInfo(arch, "", frozenset(), "unknown")
    if system == "Darwin":
        return _macos(arch)
    return CpuInfo(arch, platform.processor(), frozenset(), "unknown")
