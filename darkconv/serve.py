"""Start and stop a real NVIDIA Triton Inference Server on a model repository.

The server is the ``tritonserver`` binary (with its python backend and stub) that ships
inside the ``nvidia-pytriton==0.7.0`` wheel on PyPI. darkconv never pip-installs PyTriton
(it pins ``numpy<2``; darkconv runs on numpy 2): the wheel is fetched once from its pinned
URL, its sha256 and size are checked, and only the server's files are extracted into
``$DARKCONV_CACHE/tritonserver/`` (see :mod:`darkconv.zoo`). The python backend's stub
embeds *this* interpreter (``libpython`` of the Python that runs darkconv), so the
repository's python models import this darkconv and this numpy.

Known limit of that stub (built with pybind11 2.10, before numpy 2 support): under numpy 2
its ``Tensor.as_numpy()`` and ``Tensor(name, ndarray)`` corrupt data (the array strides come
from a numpy-1 struct layout). darkconv's python models therefore move every numeric tensor
through DLPack, which works on every python backend, and the bundled server cannot read
TYPE_STRING inputs: repositories for it take encoded images as TYPE_UINT8 (``image_input=
"uint8"``). NGC's Triton 24.12+ (pybind11 2.12) reads both.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from .errors import DarkconvError
from .zoo import PYPI_FILES, Archive, cache_root, download

#: the wheel that carries the server binary (python backend only: no onnxruntime/TensorRT backends)
SERVER_WHEEL = Archive(
    "nvidia-pytriton==0.7.0",
    f"{PYPI_FILES}/packages/65/15/9192f7ffe7fab32f545d2a51bdde01e8a50363b8694f0d441efe0cc5310d/"
    "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl",
    "21f063ff93bb426d0c06b7a55e7eb9efcfe62c0dddd9a908e9877e18710128df", 55369373)
_PREFIXES = ("pytriton/tritonserver/", "nvidia_pytriton.libs/")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


class ServerError(DarkconvError):
    """The Triton server could not be installed, started, or did not become ready."""


# -- installing the bundled server -----------------------------------------------------------
def server_home() -> Path:
    return cache_root() / "tritonserver" / "pytriton-0.7.0"


def _python_tag() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def python_libdir() -> Path:
    """The folder holding this interpreter's ``libpython`` (the stub links it), or a ServerError."""
    lib = sysconfig.get_config_var("LDLIBRARY") or ""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (libdir / lib).is_file():
        raise ServerError(f"the Triton python backend embeds libpython{_python_tag()}.so, but this Python "
                          f"({sys.executable}) was built without a shared library: use a Python built with "
                          "--enable-shared (Debian's, pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared) or NGC's "
                          "Triton container")
    return libdir


def _installed(home: Path) -> bool:
    stub = home / "tritonserver" / "backends" / "python" / "triton_python_backend_stub"
    tag = home / "stub-python"
    return (home / "tritonserver" / "bin" / "tritonserver").is_file() and stub.is_file() and tag.is_file() and \
        tag.read_text().strip() == _python_tag()


def install_server(log=print) -> Path:
    """The bundled server's root (``bin/tritonserver``, ``backends/python``), installing it on first use.

    Installs run one at a time (a lock file next to the cache folder), so parallel test runs and
    servers never see a half-extracted or replaced server.
    """
    import fcntl

    home = server_home()
    if _installed(home):
        return home / "tritonserver"
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        raise ServerError("the bundled Triton server is a Linux x86-64 binary: on this machine run NGC's Triton "
                          "container on a repository from `darkconv export triton`")
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed(home):  # another process may have installed it while we waited
            _install(home, log)
    return home / "tritonserver"


def _install(home: Path, log) -> None:
    a = SERVER_WHEEL
    log(f"darkconv: fetching the Triton server from PyPI ({a.package}, {a.size / 1e6:.0f} MB) into {home}")
    with tempfile.TemporaryDirectory(prefix="darkconv-triton-", dir=home.parent) as tmp:
        wheel = download(a, Path(tmp) / "server.whl", log)
        out = Path(tmp) / "root"
        with zipfile.ZipFile(wheel) as z:  # only the server's files; none of PyTriton's Python is used
            for info in z.infolist():
                if not info.filename.startswith(_PREFIXES) or info.is_dir():
                    continue
                rel = info.filename.split("/", 1)[1] if info.filename.startswith("pytriton/") else info.filename
                dest = out / rel
                if ".." in Path(rel).parts:
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
        srv = out / "tritonserver"
        src_stub = srv / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
        if not src_stub.is_file():
            have = sorted(p.name for p in (srv / "python_backend_stubs").iterdir())
            raise ServerError(f"{a.package} has python backend stubs for Python {', '.join(have)}, not "
                              f"{_python_tag()}: run darkconv serve with one of those")
        shutil.copy(src_stub, srv / "backends" / "python" / "triton_python_backend_stub")
        shutil.rmtree(srv / "python_backend_stubs")
        for exe in (srv / "bin" / "tritonserver", srv / "backends" / "python" / "triton_python_backend_stub"):
            exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        (out / "stub-python").write_text(_python_tag() + "\n")
        if home.exists():
            shutil.rmtree(home)
        os.replace(out, home)


# -- ports -----------------------------------------------------------------------------------
def port_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int = 3) -> list[int]:
    """``n`` distinct TCP ports that are free right now (for tests and benchmarks)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# -- what the bundled server can serve -------------------------------------------------------
def _stub_reads_numpy() -> bool:
    """Whether the bundled stub's ``as_numpy()`` works here: its pybind11 (2.10) predates numpy 2."""
    import numpy as np

    return int(np.__version__.split(".")[0]) < 2


def check_repository(repo) -> None:
    """Refuse, in one line, what the bundled server (python backend only) cannot serve in ``repo``."""
    from .triton_config import parse_config

    for cfg_path in sorted(Path(repo).glob("*/config.pbtxt")):
        cfg = parse_config(cfg_path)
        if cfg.platform and cfg.platform != "ensemble":
            raise ServerError(f"model {cfg.name!r} is {cfg.platform}, but the bundled Triton server has only the "
                              "python backend: export with --platform python, or serve this repository with NGC's "
                              "Triton container", file=str(cfg_path))
        if cfg.backend and cfg.backend != "python":
            raise ServerError(f"model {cfg.name!r} needs the {cfg.backend} backend; the bundled server has only "
                              "python", file=str(cfg_path))
        if cfg.backend == "python" and not _stub_reads_numpy():
            from tritonclient.grpc import model_config_pb2 as pb

            if any(t.data_type == pb.TYPE_STRING for t in cfg.input):
                raise ServerError(f"model {cfg.name!r} takes TYPE_STRING input, which the bundled python backend "
                                  "stub cannot read under numpy 2: export with --image-input uint8 (NGC's Triton "
                                  "24.12+ reads both)", file=str(cfg_path))


# -- the server process ----------------------------------------------------------------------
_LOAD_FAILED = re.compile(r"failed to load '([^']+)'[^:]*: (.*?)(?:\"|$)")


class TritonServer:
    """One ``tritonserver`` process on ``repo`` (a folder or a list of them): ``with TritonServer(repo) as s: ...``.

    Started in its own process group (so the stub processes it spawns go with it); stopped
    with SIGTERM, then SIGKILL after ``grace`` seconds. The log goes to ``log_path``.
    """

    def __init__(self, repo, *, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 host: str = "127.0.0.1", log_path=None, extra_args=(), log=None):
        self.repos = [Path(r).resolve() for r in ([repo] if isinstance(repo, (str, os.PathLike)) else repo)]
        self.ports = {"http": int(http_port), "grpc": int(grpc_port), "metrics": int(metrics_port)}
        self.host = host
        self.extra_args = list(extra_args)
        self.log = log or (lambda *_a, **_k: None)
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None  # a temporary file from start() on
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    def command(self, root: Path) -> list[str]:
        return [str(root / "bin" / "tritonserver"), *(f"--model-repository={r}" for r in self.repos),
                f"--backend-directory={root / 'backends'}", f"--cache-directory={root / 'caches'}",
                f"--http-port={self.ports['http']}", f"--grpc-port={self.ports['grpc']}",
                f"--metrics-port={self.ports['metrics']}", f"--http-address={self.host}",
                f"--grpc-address={self.host}", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
                "--disable-auto-complete-config", "--strict-readiness=true", "--exit-on-error=true",
                "--log-verbose=0", "--backend-config=python,shm-default-byte-size=16777216",
                "--backend-config=python,shm-growth-byte-size=16777216", *self.extra_args]

    def environment(self, root: Path) -> dict:
        """The server's environment: this Python's libpython first (the stub links it), this sys.path."""
        env = dict(os.environ)
        libs = [str(python_libdir()), str(root.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
                                                         if p])
        here = str(Path(__file__).resolve().parents[1])  # this darkconv, before any other
        paths = [here] + [p for p in sys.path if p and Path(p).is_dir() and p != here]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONHOME"] = sys.base_prefix  # the stdlib of this Python (a venv's packages come via PYTHONPATH)
        env["PYTHONNOUSERSITE"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self, timeout: float = 120.0) -> "TritonServer":
        for r in self.repos:
            if not r.is_dir():
                raise ServerError("no such model repository folder", file=str(r))
            check_repository(r)
        for kind, port in self.ports.items():
            if not port_free(port, self.host):
                raise ServerError(f"port {port} ({kind}) is already in use: stop what listens there or pass "
                                  f"--{kind}-port")
        root = install_server(log=self.log)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="darkconv-tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        logf = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.command(root), stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.environment(root),
                                         start_new_session=True)
        finally:
            logf.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def failure(self) -> str:
        """One line saying why the server did not come up, read from its log."""
        text = self.log_text()
        m = _LOAD_FAILED.search(text)
        if m:
            return f"model {m.group(1)!r} failed to load: {m.group(2).strip()}"
        for line in text.splitlines():
            low = line.lower()
            if "already in use" in low or "failed to bind" in low or "unable to bind" in low:
                return f"a port is already in use ({line.strip()[-120:]})"
        for line in text.splitlines():
            if line.startswith("E") and "]" in line:
                return line.split("]", 1)[1].strip().strip('"')
        tail = [line for line in text.splitlines() if line.strip()][-1:]
        return tail[0].strip() if tail else "no output"

    def wait_ready(self, timeout: float) -> None:
        url = f"http://{self.host}:{self.ports['http']}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll() if self.proc else None
            if code is not None:
                raise ServerError(f"the Triton server exited ({code}) before it was ready: {self.failure()} "
                                  f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the Triton server was not ready after {timeout:.0f} s: {self.failure()} "
                                  f"(log: {self.log_path})")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole server process group at once (a crash, for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM the server (it unloads models, ends its stubs), SIGKILL its group after ``grace`` s."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything left in the group (a stuck stub) goes too
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
        return p.returncode

    def close(self) -> None:
        self.stop()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()
