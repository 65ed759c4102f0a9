"""A result as text (the tables ``darkconv bench`` prints) and as JSON."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write
from ..pipeline import RANDOM_WEIGHTS
from .stats import STAGES


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The human-readable table(s) of a result."""
    m, b, env, load = result["model"], result["backend"], result.get("environment") or {}, result["load"]
    name = Path(m["path"]).name + (f" + {Path(m['weights']).name}" if m.get("weights") else "")
    if m.get("random_weights"):
        name += f" [{RANDOM_WEIGHTS}]"
    size = f"{m['input'][0]}x{m['input'][1]}" if m.get("input") else "?"
    out = [f"model    {name}, input {size}",
           f"backend  {b.get('describe') or b['name']}, {b['precision']}, {b.get('threads') or '?'} thread(s)",
           f"machine  {env.get('cpu_model', '?')}, {env.get('cpu_cores', '?')} cores"
           + (f", GPU {env['gpu']}" if env.get("gpu") else "")
           + (f", load avg {env['load_avg_1_5_15'][0]}" if env.get("load_avg_1_5_15") else "")]
    parts = [f"{label} {load[k]:.3f} s" for k, label in (("model_load_s", "model load"), ("export_s", "ONNX export"),
             ("engine_build_s", "engine build"), ("session_create_s", "session creation")) if load.get(k) is not None]
    out.append("load     " + (", ".join(parts) if parts else "-"))
    rows = [["batch", "iters", "mean ms", "p50 ms", "p90 ms", "p99 ms", "min ms", "ms/img", "img/s"]]
    errors = []
    for r in result["results"]:
        lat = r.get("latency") or {}
        if r.get("error") and not lat:
            errors.append(f"batch {r['batch']}: {r['error']}")
            rows.append([str(r["batch"]), "0"] + ["error"] + ["-"] * 6)
            continue
        rows.append([str(r["batch"]), str(lat.get("iters", 0))] +
                    [_f(lat.get(k)) for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "per_image_ms")] +
                    [_f(lat.get("throughput_ips"), "{:.1f}")])
        if r.get("error"):
            errors.append(f"batch {r['batch']}: {r['error']}")
    out += ["", "inference (warmup excluded)", _table(rows)]
    conc = [(r["batch"], c) for r in result["results"] for c in (r.get("concurrency") or [])]
    if conc:
        rows = [["batch", "in flight", "calls", "p50 ms", "p99 ms", "img/s"]]
        rows += [[str(b), str(c["concurrency"]), str(c["iters"]), _f(c["p50_ms"]), _f(c["p99_ms"]),
                  _f(c["throughput_ips"], "{:.1f}")] for b, c in conc]
        out += ["", "concurrent requests (closed loops; img/s = images / wall time)", _table(rows)]
    e2e_rows = [r for r in result["results"] if r.get("e2e")]
    if e2e_rows:
        rows = [["batch", "iters", "decode", "preprocess", "inference", "postprocess", "total ms/img", "img/s",
                 "raw ms/img", "e2e/raw"]]
        for r in e2e_rows:
            e = r["e2e"]
            rows.append([str(r["batch"]), str(e["iters"])] + [_f(e[f"{s}_ms"]) for s in STAGES] +
                        [_f(e["total_ms"]), _f(e["throughput_ips"], "{:.1f}"), _f(e.get("raw_inference_ms")),
                         _f(e["e2e_over_inference"], "{:.2f}x")])
        out += ["", "end to end, ms per image (decode = file read + JPEG decode; raw = a bare inference call "
                "timed in the same iteration)", _table(rows)]
    for e in errors:
        out.append(f"error: {e}")
    for n in result.get("notes", []):
        out.append(f"note: {n}")
    if result.get("interrupted"):
        out.append("interrupted: the figures above are what was measured before Ctrl-C")
    return "\n".join(out)


def write_json(result: dict, path) -> Path:

    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, [(json.dumps(result, indent=2) + "\n").encode()])
    return path
