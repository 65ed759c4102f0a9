"""Triton Inference Server backend: the raw heads of a served darkconv model, from one server or a fleet.

``TritonRunner("yolov3-tiny", "host1:8000,host2:8000")`` sends each batch (float32 ``images``)
to the served network and returns its ``head_<layer>`` tensors, so the client decodes with the one
shared postprocessor exactly as for a local backend. The spec comes from the server (the model
config's ``darkconv.spec`` parameter).

* URLs: ``HOST:PORT`` (HTTP; port 8001 means gRPC, Triton's default), ``http://HOST:PORT`` or
  ``grpc://HOST:PORT``; comma separated.
* Spreading: each request goes to the server with the fewest requests in flight from this
  runner (round robin among equals). ``infer`` is thread-safe (one client per thread and
  server), so many requests can be in flight at once.
* Faults: a failed request is retried on another server (a server that failed is skipped for
  ``cooldown`` seconds); after ``retries`` attempts the batch raises
  :class:`~darkconv.errors.InferenceError` and the caller reports its images as failed.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..darknet.spec import INPUT_NAME, SPEC_KEY, ModelSpec
from ..errors import BackendUnavailable, DarkconvError, InferenceError
from .base import Runner, outputs_by_name

SPEC_PARAM = SPEC_KEY
INPUT = INPUT_NAME


def parse_urls(urls) -> list[tuple[str, str]]:
    """'a:8000,grpc://b:8001' -> [('http', 'a:8000'), ('grpc', 'b:8001')]."""
    items = urls if isinstance(urls, (list, tuple)) else str(urls or "").split(",")
    out = []
    for u in (x.strip() for x in items):
        if not u:
            continue
        proto = None
        if "://" in u:
            proto, u = u.split("://", 1)
            proto = proto.lower()
            if proto not in ("http", "grpc"):
                raise DarkconvError(f"{proto}://{u}: the Triton URL scheme is http:// or grpc://")
        host, _, port = u.rstrip("/").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DarkconvError(f"{u!r}: expected HOST:PORT (e.g. localhost:8000) in --url")
        out.append((proto or ("grpc" if port == "8001" else "http"), f"{host}:{port}"))
    if not out:
        raise DarkconvError("the triton backend needs --url HOST:PORT[,HOST:PORT...] of running Triton servers")
    return out


@dataclass
class Endpoint:
    protocol: str
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    ok: int = 0
    failed: int = 0
    local: threading.local = field(default_factory=threading.local, repr=False)

    def client(self, timeout: float):
        c = getattr(self.local, "client", None)
        if c is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as grpcclient
                c = grpcclient.InferenceServerClient(self.url)
            else:
                import tritonclient.http as httpclient
                c = httpclient.InferenceServerClient(self.url, connection_timeout=timeout, network_timeout=timeout)
            self.local.client = c
        return c

    def reset(self) -> None:
        c = getattr(self.local, "client", None)
        self.local.client = None
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - a dead connection may fail to close
                pass

    def __str__(self) -> str:
        return f"{self.protocol}://{self.url}"


def _module(protocol):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as m
        else:
            import tritonclient.http as m
    except ImportError:
        raise BackendUnavailable("the triton backend needs tritonclient: pip install 'tritonclient[http,grpc]'") \
            from None
    return m


class TritonRunner(Runner):
    name = "triton"

    def __init__(self, model: str, urls, *, timeout: float = 60.0, retries: int | None = None,
                 cooldown: float = 2.0, version: str = ""):
        self.model, self.version = str(model), version
        self.endpoints = [Endpoint(p, u) for p, u in parse_urls(urls)]
        for e in self.endpoints:
            _module(e.protocol)
        self.timeout, self.cooldown = float(timeout), float(cooldown)
        self.retries = retries if retries is not None else max(2, len(self.endpoints) + 1)
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self.spec, self.outputs, self.max_batch = self._fetch_spec()

    # -- server side facts ---------------------------------------------------------------
    def _config(self, ep: Endpoint) -> dict:
        c = ep.client(self.timeout)
        if ep.protocol == "grpc":
            return c.get_model_config(self.model, self.version, as_json=True)["config"]
        return c.get_model_config(self.model, self.version)

    def _fetch_spec(self) -> tuple[ModelSpec, list[str], int]:
        errors = []
        for ep in self.endpoints:
            try:
                cfg = self._config(ep)
            except Exception as e:  # noqa: BLE001 - report every server's answer
                errors.append(f"{ep}: {_short(e)}")
                ep.reset()
                continue
            params = cfg.get("parameters", {})
            if SPEC_PARAM not in params:
                raise DarkconvError(f"model {self.model!r} on {ep} has no {SPEC_PARAM} parameter: serve a "
                                    "repository written by `darkconv export triton`")
            spec = ModelSpec.from_json(params[SPEC_PARAM]["string_value"])
            outputs = outputs_by_name(spec, [o["name"] for o in cfg.get("output", [])],
                                      where=f"{ep}/{self.model}",
                                      hint="serve a repository written by `darkconv export triton`")
            return spec, outputs, int(cfg.get("max_batch_size", 0))
        raise BackendUnavailable(f"no Triton server answered for model {self.model!r}: " + "; ".join(errors))

    def activate(self) -> None:
        ready = []
        for ep in self.endpoints:
            try:
                if ep.client(self.timeout).is_model_ready(self.model, self.version):
                    ready.append(ep)
            except Exception:  # noqa: BLE001
                ep.reset()
        if not ready:
            raise BackendUnavailable(f"model {self.model!r} is not ready on any of "
                                     f"{', '.join(map(str, self.endpoints))}")

    # -- requests ------------------------------------------------------------------------
    def _pick(self, tried: set) -> Endpoint:
        now = time.monotonic()
        with self._lock:
            fresh = [e for e in self.endpoints if id(e) not in tried]
            pool = [e for e in fresh if e.down_until <= now] or fresh or self.endpoints
            k = next(self._rr)
            order = pool[k % len(pool):] + pool[:k % len(pool)]
            ep = min(order, key=lambda e: e.in_flight)
            ep.in_flight += 1
            return ep

    def _call(self, ep: Endpoint, x: np.ndarray) -> list[np.ndarray]:
        m = _module(ep.protocol)
        inp = m.InferInput(INPUT, list(x.shape), "FP32")
        if ep.protocol == "http":
            inp.set_data_from_numpy(x, binary_data=True)
            outs = [m.InferRequestedOutput(n, binary_data=True) for n in self.outputs]
            r = ep.client(self.timeout).infer(self.model, [inp], model_version=self.version, outputs=outs)
        else:
            inp.set_data_from_numpy(x)
            outs = [m.InferRequestedOutput(n) for n in self.outputs]
            r = ep.client(self.timeout).infer(self.model, [inp], model_version=self.version, outputs=outs,
                                              client_timeout=self.timeout)
        heads = [r.as_numpy(n) for n in self.outputs]
        if any(h is None or h.shape[0] != x.shape[0] for h in heads):
            raise InferenceError(f"{ep} returned incomplete outputs for model {self.model!r}")
        return heads

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(batch, np.float32)
        if self.max_batch and x.shape[0] > self.max_batch:
            raise DarkconvError(f"the served model {self.model!r} takes at most {self.max_batch} images per request "
                                f"(max_batch_size), got {x.shape[0]}: use --batch {self.max_batch} or less")
        tried: set = set()
        errors = []
        for attempt in range(self.retries):
            ep = self._pick(tried)
            if id(ep) in tried and attempt:  # every server already failed once: give it a moment
                time.sleep(min(1.0, 0.2 * attempt))
            try:
                heads = self._call(ep, x)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a dead or failing server: try another
                errors.append(f"{ep}: {_short(e)}")
                ep.reset()
                with self._lock:
                    ep.failed += 1
                    ep.in_flight -= 1
                    ep.down_until = time.monotonic() + self.cooldown
                tried.add(id(ep))
                continue
            with self._lock:
                ep.ok += 1
                ep.in_flight -= 1
            return heads
        raise InferenceError(f"model {self.model!r}: batch of {x.shape[0]} failed after {len(errors)} attempt(s): "
                             + "; ".join(errors[-3:]))

    def stats(self) -> dict:
        """Requests answered / failed per server (by this runner)."""
        return {str(e): {"ok": e.ok, "failed": e.failed} for e in self.endpoints}

    def deactivate(self) -> None:
        for e in self.endpoints:
            e.reset()

    def describe(self) -> str:
        return f"triton {self.model} @ {', '.join(map(str, self.endpoints))}"


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {msg}"[:200]


def served_name(model) -> str:
    """The served model's name for MODEL: a name as given, a model folder's or file's stem, or the one
    darkconv network of a repository folder."""
    from pathlib import Path

    p = Path(str(model))
    if p.is_dir():
        if (p / "config.pbtxt").is_file():
            return p.name
        from ..triton_config import repository_models

        names = repository_models(p)
        if len(names) != 1:
            raise DarkconvError(f"the repository has {len(names)} darkconv networks ({', '.join(names) or 'none'}): "
                                "give the served model's name as MODEL", file=str(p))
        return names[0]
    if p.suffix.lower() in (".cfg", ".onnx", ".plan", ".engine"):
        return p.stem
    return str(model)
