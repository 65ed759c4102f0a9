"""Text for INT8 conversions: the lines ``darkconv convert`` prints and the layer-sensitivity report file.

The numbers come from :mod:`darkconv.int8`; nothing here computes them.
"""
from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write
from .int8 import Int8Outcome, fmt_agreement


def _f(v, spec="{:.4f}") -> str:
    return "-" if v is None else spec.format(v)


def outcome_lines(out: Int8Outcome, split_note: str | None = None) -> list[str]:
    """What ``convert`` says about an INT8 conversion: recipe and why, data, held-out agreement, latency."""
    r, c = out.recipe, out.calib
    lines = [f"INT8 recipe {r.name} ({r.target}): {r.summary}",
             f"  why: {out.reason}",
             f"  calibration: {len(c.images)} image(s), {c.method}; held-out check: {len(out.check_names)} "
             f"image(s) with {out.truths} FP32 detection(s) > 0.25" + (f" ({split_note})" if split_note else "")]
    if out.truths == 0:
        lines.append("  warning: the FP32 model detects nothing above 0.25 on the check images, so agreement says "
                     "nothing; pass --check DIR with images where it detects objects")
    lines.append(f"  held-out agreement with FP32 (Darknet map AP@0.5): {fmt_agreement(out.agreement_all)} "
                 f"with every conv INT8")
    if out.float_layers:
        kind = "FP16" if r.target == "tensorrt" else "FP32"
        lines.append(f"  mixed precision: {len(out.float_layers)} conv(s) left {kind} (Darknet layers "
                     f"{', '.join(map(str, out.float_layers))}): agreement {fmt_agreement(out.agreement)}"
                     f" (budget {out.budget})")
    elif out.budget is not None:
        lines.append(f"  budget {out.budget}: {'met' if out.met else 'MISSED'} with every conv INT8")
    lat = out.latency_ms
    if lat.get("fp32"):
        parts = [f"FP32 {lat['fp32']:.1f} ms"]
        for k, label in (("int8_all", "INT8"), ("int8_mixed", "mixed")):
            if lat.get(k):
                parts.append(f"{label} {lat[k]:.1f} ms ({lat[k] / lat['fp32']:.2f}x)")
        note = " (TensorRT Q/DQ run by ONNX Runtime: not the engine's speed)" if r.target == "tensorrt" else ""
        lines.append(f"  latency here (ONNX Runtime CPU, batch 1, medians): {', '.join(parts)}{note}")
    return lines


def sensitivity_markdown(out: Int8Outcome, model_name: str = "") -> str:
    rows = out.sensitivity or []
    L = [f"# INT8 layer sensitivity{': ' + model_name if model_name else ''}", "",
         f"- recipe: {out.recipe.name} ({out.recipe.summary})",
         f"- calibration: {len(out.calib.images)} image(s), {out.calib.method}; probes on the "
         f"{len(out.check_names)} held-out image(s) ({out.truths} FP32 detections > 0.25)",
         f"- every conv INT8 (ONNX Runtime): agreement {fmt_agreement(out.agreement_all)}, head error "
         f"{out.head_err_all:.4f}",
         f"- probes: torch with fake quantization from the same calibration table; `only q`: only this conv "
         f"quantized, `only float`: every conv quantized except this one; head error = mean over heads of "
         f"‖INT8 − FP32‖ / ‖FP32‖; agreement = Darknet map AP@0.5 vs FP32 detections > 0.25"
         + (f"; {out.sensitivity_s:.1f} s" if out.sensitivity_s else ""),
         "", "| rank | layer | FLOPs share | head err (only q) | agreement (only q) | head err (only float) "
             "| agreement (only float) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for k, s in enumerate(rows, 1):
        L.append(f"| {k} | {s.layer} | {s.flops_share * 100:.1f} % | {_f(s.head_err_only)} | {_f(s.agreement_only)} "
                 f"| {_f(s.head_err_float)} | {_f(s.agreement_float)} |")
    if out.float_layers:
        L += ["", f"Mixed precision left {len(out.float_layers)} conv(s) float: {out.float_layers}; agreement "
                  f"{fmt_agreement(out.agreement)} (budget {out.budget}); tries (float convs, agreement): {out.tries}"]
    return "\n".join(L) + "\n"


def write_report(path, out: Int8Outcome, model_name: str = "") -> Path:
    """The sensitivity report as Markdown, or as JSON when ``path`` ends in .json (atomically)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        doc = {"recipe": out.recipe.as_dict(), "calibration": out.calib.as_dict(), **out.record(),
               "head_err_all_int8": out.head_err_all, "float_layers": out.float_layers, "tries": out.tries,
               "sensitivity_s": out.sensitivity_s, "layers": [s.as_dict() for s in out.sensitivity or []]}
        text = json.dumps(doc, indent=1)
    else:
        text = sensitivity_markdown(out, model_name)
    atomic_write(path, [text.encode()])
    return path
