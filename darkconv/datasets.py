"""Labelled images for ``darkconv eval``: Darknet ``.data`` + YOLO label files, COCO JSON, plain image lists.

Darknet (AlexeyAB ``src/``) is mirrored where it decides *which* file holds which label:

``.data`` (``read_data_cfg``, src/option_list.c)
    one ``key=value`` per line; Darknet removes **every** space and tab of a line (``strip``), skips
    empty lines and lines starting with ``#`` or ``;``; the first occurrence of a key wins.
    ``valid=`` (the image list), ``names=``; ``classes=`` is checked against the model when present.
    Darknet opens these paths as given, i.e. relative to the current directory. When a relative
    ``valid=`` is not found there, darkconv looks relative to the ``.data`` file's folder and then
    its parent (the usual ``darknet/`` root for ``data/obj.data``), says which base it took, and
    resolves ``names=`` and the listed image paths against that same base.
image list (``get_paths`` / ``fgetl``, src/data.c, src/utils.c)
    one path per line, a trailing ``\\r`` removed, nothing else trimmed; empty lines skipped.
label path (``replace_image_to_label``, src/utils.c) -- see :func:`replace_image_to_label`.
label file (``read_boxes``, src/data.c)
    ``class cx cy w h`` relative to the image. Darknet reads it with ``fscanf("%d %f %f %f %f")``
    and silently stops at the first token it cannot parse; darkconv instead raises a one-line
    :class:`DatasetError` naming ``file:line`` for a line that is not exactly five numbers, a class id
    that is not an integer in ``0..classes-1``, a non-finite coordinate, a centre outside [0, 1] or a
    width/height outside (0, 1] (1e-6 of slack for rounding). A missing label file is an image
    without objects, as in Darknet, and is counted.

Not supported: ``difficult=`` (Darknet's VOC-only list of difficult objects): it is an error rather
than a silently different figure.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DarkconvError
from .metrics import Truth
from .preprocess import list_images

__all__ = ["DatasetError", "LabelledImage", "Dataset", "replace_image_to_label", "read_label_file",
           "read_data_file", "load_darknet", "load_coco", "load_images_only", "load_dataset", "COCO_IDS"]


class DatasetError(DarkconvError):
    """A dataset (``.data``, image list, label file, COCO JSON) is malformed."""


#: Darknet's 80-class -> COCO category id table (``coco_ids`` in src/detector.c)
COCO_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
            33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
            60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)

# --------------------------------------------------------------------------- Darknet's label path
#: ``find_replace`` calls of ``replace_image_to_label``, in Darknet's order (first occurrence only)
LABEL_DIR_REPLACEMENTS = (
    ("/images/train2017/", "/labels/train2017/"),
    ("/images/val2017/", "/labels/val2017/"),
    ("/JPEGImages/", "/labels/"),
    ("\\images\\train2017\\", "\\labels\\train2017\\"),
    ("\\images\\val2017\\", "\\labels\\val2017\\"),
    ("\\images\\train2014\\", "\\labels\\train2014\\"),
    ("\\images\\val2014\\", "\\labels\\val2014\\"),
    ("/images/train2014/", "/labels/train2014/"),
    ("/images/val2014/", "/labels/val2014/"),
    ("\\JPEGImages\\", "\\labels\\"),
)
#: ``find_replace_extension`` calls (only at the end of the path), in Darknet's order
LABEL_EXTENSIONS = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG", ".bmp", ".BMP", ".ppm", ".PPM",
                    ".tiff", ".TIFF")


def _find_replace(s: str, orig: str, rep: str) -> str:
    """``find_replace``: the first occurrence of ``orig`` only."""
    at = s.find(orig)
    return s if at < 0 else s[:at] + rep + s[at + len(orig):]


def _find_replace_extension(s: str, orig: str, rep: str) -> str:
    """``find_replace_extension``: the last occurrence of ``orig``, only if it ends the string."""
    at = s.rfind(orig)
    return s if at < 0 or at + len(orig) != len(s) else s[:at] + rep


def replace_image_to_label(image_path: str) -> str:
    """The label file Darknet reads for ``image_path`` (``replace_image_to_label``, src/utils.c).

    Only these folder names are mapped (first occurrence each, in this order, slashes included, so
    a relative ``images/val2017/x.jpg`` without a leading slash is *not* mapped):
    ``/images/train2017/`` ``/images/val2017/`` ``/JPEGImages/`` (to ``/labels/...``; ``JPEGImages``
    becomes ``labels``), the same with backslashes, and ``train2014``/``val2014``. Otherwise the
    ``.txt`` sits beside the image. Then spaces/tabs at both ends are trimmed and the extension
    ``.jpg .JPG .jpeg .JPEG .png .PNG .bmp .BMP .ppm .PPM .tiff .TIFF`` becomes ``.txt``. Any other
    extension (``.tif``, ``.webp``, ``.Jpg``...) is left as it is: Darknet prints "Failed to infer
    label file name" and reads the image file itself as labels; darkconv raises :class:`DatasetError`.
    """
    out = str(image_path)
    for orig, rep in LABEL_DIR_REPLACEMENTS:
        out = _find_replace(out, orig, rep)
    out = out.strip(" \t")
    for ext in LABEL_EXTENSIONS:
        out = _find_replace_extension(out, ext, ".txt")
    if len(out) <= 4 or not out.endswith(".txt"):
        raise DatasetError("cannot infer the label file name: Darknet maps only the extensions "
                           f"{' '.join(LABEL_EXTENSIONS)} to .txt (it would read the image itself as labels); "
                           "rename the image or convert it", file=str(image_path))
    return out


# --------------------------------------------------------------------------- YOLO label files
_SLACK = 1e-6


def read_label_file(path, classes: int | None = None) -> tuple[Truth, np.ndarray] | None:
    """Read a YOLO label file: ``(Truth, line numbers of its boxes)``, or None when the file is missing.

    Each non-empty line must be ``class cx cy w h``; see the module docstring for what is an error.
    ``classes`` (when known) bounds the class ids.
    """
    p = os.fspath(path)
    try:
        raw = Path(p).read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise DatasetError("the label path is a directory, not a file", file=p) from None
    except OSError as e:
        raise DatasetError(f"cannot read the label file ({e.strerror or e})", file=p) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError("not a text file (a YOLO label file has lines 'class cx cy w h')", file=p) from None
    boxes, ids, lines = [], [], []
    for n, line in enumerate(text.splitlines(), start=1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) != 5:
            raise DatasetError(f"expected 5 values 'class cx cy w h', found {len(tok)}: {line.strip()[:60]!r}",
                               file=p, line=n)
        try:
            cid = int(tok[0])
        except ValueError:
            raise DatasetError(f"class id {tok[0]!r} is not an integer", file=p, line=n) from None
        try:
            vals = [float(t) for t in tok[1:]]
        except ValueError:
            bad = next(t for t in tok[1:] if not _is_float(t))
            raise DatasetError(f"coordinate {bad!r} is not a number", file=p, line=n) from None
        if cid < 0 or (classes is not None and cid >= classes):
            raise DatasetError(f"class id {cid} is outside 0..{classes - 1 if classes else '?'} "
                               f"(the model has {classes} classes)", file=p, line=n)
        for what, t, v in zip(("cx", "cy", "w", "h"), tok[1:], vals):
            if not math.isfinite(v):
                raise DatasetError(f"{what} = {t} is not finite", file=p, line=n)
        cx, cy, w, h = vals
        for what, v in (("cx", cx), ("cy", cy)):
            if not -_SLACK <= v <= 1 + _SLACK:
                raise DatasetError(f"{what} = {v:g} is outside [0, 1] (YOLO labels are relative to the image size)",
                                   file=p, line=n)
        for what, v in (("w", w), ("h", h)):
            if not 0 < v <= 1 + _SLACK:
                raise DatasetError(f"{what} = {v:g} is outside (0, 1] (YOLO labels are relative to the image size)",
                                   file=p, line=n)
        boxes.append(vals)
        ids.append(cid)
        lines.append(n)
    return Truth(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(ids, np.int64)), np.asarray(lines, np.int64)


def _is_float(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- the dataset
@dataclass
class LabelledImage:
    """One image to evaluate: where it is, where its labels are, and its truths (None = unlabelled)."""

    path: Path
    truth: Truth | None = None
    label_path: Path | None = None   # Darknet labels: the file read (or missing)
    label_lines: np.ndarray | None = None
    image_id: int | None = None      # COCO: the annotation file's image id
    size: tuple[int, int] | None = None  # COCO: (width, height) from the annotation file
    coco_objects: tuple | None = None    # COCO: (relative boxes (M, 4), category ids) until bound to a model


@dataclass
class Dataset:
    """What ``darkconv eval`` runs on. ``kind``: ``darknet`` (YOLO label files), ``coco`` (annotations
    JSON) or ``images`` (no labels: agreement mode only)."""

    kind: str
    source: str
    images: list[LabelledImage]
    names: tuple[str, ...] | None = None     # from the .data names= (checked against the model)
    classes: int | None = None               # from the .data classes=
    coco: dict | None = None                 # COCO: the parsed annotations (images, annotations, categories)
    notes: list[str] = field(default_factory=list)
    category_map: dict | None = None         # COCO: category id -> model class (after :meth:`bind`)

    @property
    def missing_labels(self) -> int:
        return sum(1 for im in self.images if self.kind == "darknet" and im.truth is None)

    def truths(self) -> list[Truth]:
        """One Truth per image (an image without a label file has none)."""
        return [im.truth if im.truth is not None else Truth.empty() for im in self.images]

    def objects(self) -> int:
        """Labelled objects (COCO: crowd regions left out)."""
        return sum(len(im.truth) if im.truth is not None else len(im.coco_objects[1]) if im.coco_objects else 0
                   for im in self.images)

    def bind(self, classes: int, names) -> None:
        """Check the dataset against a model with ``classes`` classes called ``names`` (one-line errors),
        and, for COCO, map its categories to the model's classes (:func:`map_coco_categories`)."""
        if self.kind == "coco":
            self.category_map = map_coco_categories(self.coco["categories"], names)
            for im in self.images:
                boxes, cats = im.coco_objects
                im.truth = Truth(boxes, np.asarray([self.category_map[c] for c in cats], np.int64))
            return
        if self.classes is not None and self.classes != classes:
            raise DatasetError(f"classes={self.classes} but the model has {classes} classes", file=self.source)
        if self.names is not None and len(self.names) != classes:
            raise DatasetError(f"the names file has {len(self.names)} names but the model has {classes} classes "
                               "(Darknet's detector map stops here too)", file=self.source)
        for im in self.images:
            if im.truth is not None and len(im.truth) and int(im.truth.class_ids.max()) >= classes:
                k = int(np.argmax(im.truth.class_ids >= classes))
                line = int(im.label_lines[k]) if im.label_lines is not None else None
                raise DatasetError(f"class id {int(im.truth.class_ids[k])} is outside 0..{classes - 1} "
                                   f"(the model has {classes} classes)",
                                   file=str(im.label_path or im.path), line=line)

    def limit(self, n: int | None) -> "Dataset":
        if n is None or n >= len(self.images):
            return self
        return Dataset(self.kind, self.source, self.images[:n], self.names, self.classes, self.coco,
                       self.notes + [f"evaluating the first {n} of {len(self.images)} images (--limit)"],
                       self.category_map)

    def summary(self) -> dict:
        out = {"kind": self.kind, "source": self.source, "images": len(self.images)}
        if self.kind == "darknet":
            out.update(labelled=len(self.images) - self.missing_labels, missing_labels=self.missing_labels,
                       objects=self.objects())
        elif self.kind == "coco":
            out.update(objects=self.objects(), categories=len(self.coco["categories"]) if self.coco else None)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


# --------------------------------------------------------------------------- .data files
def read_data_file(path) -> dict[str, tuple[str, int]]:
    """``read_data_cfg``: ``key -> (value, line)``; every space/tab removed, first key wins."""
    p = os.fspath(path)
    try:
        text = Path(p).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError("no such .data file", file=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the .data file ({getattr(e, 'strerror', None) or e})", file=p) from None
    out: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        s = "".join(ch for ch in line if ch not in " \t\r\n")
        if not s or s[0] in "#;":
            continue
        key, eq, val = s.partition("=")
        if not eq or not key or not val:
            raise DatasetError(f"expected key=value, got {line.strip()[:60]!r}", file=p, line=n)
        out.setdefault(key, (val, n))
    return out


def _read_list(path: Path) -> list[str]:
    """``get_paths``: the lines of an image list, ``\\r\\n`` removed, empty lines skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError("no such image list", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the image list ({getattr(e, 'strerror', None) or e})", file=str(path)) from None
    return [line for line in text.splitlines() if line]


def _bases(data_file: Path) -> list[Path]:
    folder = data_file.resolve().parent
    return [folder, folder.parent]


def _pick_base(rel: str, data_file: Path, what: str, line: int) -> Path:
    """The folder relative paths of this .data are resolved against (see the module docstring)."""
    if Path(rel).is_absolute() or Path(rel).exists():
        return Path()                       # as Darknet: as given, relative to the current directory
    for base in _bases(data_file):
        if (base / rel).exists():
            return base
    raise DatasetError(f"{what}={rel} not found relative to the current directory (where Darknet opens it), "
                       f"nor to {data_file.resolve().parent} or its parent (note: Darknet removes every space "
                       "from .data lines)", file=str(data_file), line=line)


def _images_with_labels(paths: list[str], base: Path, classes: int | None, labels: bool = True) -> list[LabelledImage]:
    items = []
    for raw in paths:
        if not labels:
            items.append(LabelledImage(Path(raw) if Path(raw).is_absolute() else base / raw))
            continue
        label = replace_image_to_label(raw)
        img = Path(raw) if Path(raw).is_absolute() else base / raw
        lab = Path(label) if Path(label).is_absolute() else base / label
        read = read_label_file(lab, classes)
        truth, lines = read if read is not None else (None, None)
        items.append(LabelledImage(img, truth, lab, lines))
    return items


def load_darknet(data_file, classes: int | None = None, labels: bool = True) -> Dataset:
    """A Darknet ``.data`` file: its ``valid=`` images with their YOLO labels (``labels=False``: images only)."""
    from .pipeline import read_names

    data_file = Path(data_file)
    opts = read_data_file(data_file)
    src = str(data_file)
    if "difficult" in opts:
        raise DatasetError("difficult= (VOC difficult objects) is not supported: remove the line to evaluate "
                           "every labelled object", file=src, line=opts["difficult"][1])
    if "valid" not in opts:
        raise DatasetError("no valid= line (Darknet would fall back to data/train.txt): add "
                           "valid=path/to/images.txt", file=src)
    if "names" not in opts:
        raise DatasetError("no names= line: add names=path/to/obj.names", file=src)
    valid, vline = opts["valid"]
    base = _pick_base(valid, data_file, "valid", vline)
    notes = []
    if base != Path():
        notes.append(f"{data_file}: relative paths resolved against {base} (not found relative to the current "
                     "directory, where Darknet opens them)")
    names_rel, nline = opts["names"]
    names_path = Path(names_rel) if Path(names_rel).is_absolute() else base / names_rel
    if not names_path.exists():
        raise DatasetError(f"names={names_rel} not found (looked in {names_path.parent})", file=src, line=nline)
    names = read_names(names_path)
    n_classes = None
    if "classes" in opts:
        value, cline = opts["classes"]
        try:
            n_classes = int(value)
        except ValueError:
            raise DatasetError(f"classes={value} is not an integer", file=src, line=cline) from None
    valid_path = Path(valid) if Path(valid).is_absolute() else base / valid
    paths = _read_list(valid_path)
    if not paths:
        raise DatasetError("the image list is empty", file=str(valid_path))
    items = _images_with_labels(paths, base, classes, labels)
    return Dataset("darknet" if labels else "images", src, items, names=names, classes=n_classes, notes=notes)


def load_images_only(inputs) -> list[Path]:
    """Images of folders / files / ``.txt`` lists (``preprocess.list_images``); an empty result is an error."""
    files = list_images(inputs)
    if not files:
        raise DatasetError(f"no images found in {', '.join(map(str, inputs if isinstance(inputs, (list, tuple)) else [inputs]))}")
    return files


def load_folder(inputs, classes: int | None = None) -> Dataset:
    """A folder, image files or a ``.txt`` list: labels found beside/for each image by Darknet's rule.

    ``kind`` is ``images`` (unlabelled) when not one label file exists.
    """
    files = load_images_only(inputs)
    src = ", ".join(map(str, inputs)) if isinstance(inputs, (list, tuple)) else str(inputs)
    items = []
    for f in files:
        try:
            label = replace_image_to_label(str(f))
        except DatasetError:
            label = None
        read = read_label_file(label, classes) if label else None
        truth, lines = read if read is not None else (None, None)
        items.append(LabelledImage(Path(f), truth, Path(label) if label else None, lines))
    if all(im.truth is None for im in items):
        return Dataset("images", src, [LabelledImage(im.path) for im in items])
    return Dataset("darknet", src, items)


# --------------------------------------------------------------------------- COCO annotations
def _coco_error(msg, path):
    return DatasetError(f"not a COCO annotations file: {msg}", file=str(path))


def load_coco(json_path, images_dir) -> Dataset:
    """A COCO annotations JSON (``images``, ``annotations``, ``categories``) with its images in ``images_dir``.

    Crowd annotations (``iscrowd=1``) are ignored regions for the COCO metrics and are left out of the
    Darknet-style truths. Every image the file lists must be in ``images_dir``.
    """
    json_path = Path(json_path)
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DatasetError("no such COCO annotations file", file=str(json_path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the file ({getattr(e, 'strerror', None) or e})", file=str(json_path)) from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"not valid JSON ({e.msg})", file=str(json_path), line=e.lineno) from None
    if isinstance(doc, list):
        raise _coco_error("it is a list (a COCO *results* file holds a list of detections); "
                          "pass the annotations (instances_*.json)", json_path)
    if not isinstance(doc, dict):
        raise _coco_error(f"the top level is a {type(doc).__name__}, not an object", json_path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise _coco_error(f"it has no {key!r} list", json_path)
    if images_dir is None:
        raise DatasetError("a COCO annotations file needs --images DIR (the folder holding its file_name entries)",
                           file=str(json_path))
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DatasetError("--images must be a folder", file=str(images_dir))
    cats = {}
    for k, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise _coco_error(f"categories[{k}] has no integer 'id' and string 'name'", json_path)
        cats[c["id"]] = c["name"]
    if not cats:
        raise _coco_error("its 'categories' list is empty", json_path)
    imgs, seen = [], set()
    for k, im in enumerate(doc["images"]):
        if not (isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
                and isinstance(im.get("width"), int) and isinstance(im.get("height"), int)
                and im["width"] > 0 and im["height"] > 0):
            raise _coco_error(f"images[{k}] needs an integer 'id', a 'file_name' and positive integer "
                              "'width'/'height'", json_path)
        if im["id"] in seen:
            raise _coco_error(f"images[{k}]: image id {im['id']} appears twice", json_path)
        seen.add(im["id"])
        imgs.append(im)
    if not imgs:
        raise DatasetError("the COCO annotations file lists no images", file=str(json_path))
    per_image: dict[int, list] = {im["id"]: [] for im in imgs}
    for k, a in enumerate(doc["annotations"]):
        bbox = a.get("bbox") if isinstance(a, dict) else None
        if not (isinstance(a, dict) and a.get("image_id") in per_image and a.get("category_id") in cats
                and isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0):
            raise _coco_error(f"annotations[{k}] needs an 'image_id' and 'category_id' listed above and a finite "
                              "'bbox' [x, y, w, h] with w, h >= 0", json_path)
        per_image[a["image_id"]].append(a)
    missing = [im["file_name"] for im in imgs if not (images_dir / im["file_name"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of the {len(imgs)} images it lists are not in {images_dir} "
                           f"(first: {missing[0]}); pass the right --images folder", file=str(json_path))
    items = []
    for im in imgs:
        w, h = im["width"], im["height"]
        anns = [a for a in per_image[im["id"]] if not a.get("iscrowd", 0)]
        boxes = np.asarray([((a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h,
                              a["bbox"][2] / w, a["bbox"][3] / h) for a in anns], np.float32).reshape(-1, 4)
        items.append(LabelledImage(images_dir / im["file_name"], image_id=im["id"], size=(w, h),
                                   coco_objects=(boxes, [a["category_id"] for a in anns])))
    return Dataset("coco", str(json_path), items, coco={"images": imgs, "categories": doc["categories"],
                                                         "annotations": doc["annotations"]})


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def map_coco_categories(categories: list[dict], names) -> dict[int, int]:
    """COCO category id -> model class index.

    1. every category name equals a model class name (case, spaces and punctuation ignored): by name;
    2. else, as many categories as classes: the i-th category by id is class i (for COCO's 80
       categories this is exactly Darknet's ``coco_ids`` table, e.g. 'motorcycle' = 'motorbike');
    3. else a one-line error.
    """
    by_name = {_norm(n): i for i, n in enumerate(names)}
    if all(_norm(c["name"]) in by_name for c in categories):
        return {c["id"]: by_name[_norm(c["name"])] for c in categories}
    if len(categories) == len(names):
        return {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
    unknown = [c["name"] for c in categories if _norm(c["name"]) not in by_name]
    raise DatasetError(f"cannot map the {len(categories)} COCO categories to the model's {len(names)} classes: "
                       f"{', '.join(unknown[:3])}{'...' if len(unknown) > 3 else ''} match no class name "
                       "(pass --names with the model's class names)")


# --------------------------------------------------------------------------- entry point
def load_dataset(data, *, images=None, classes: int | None = None, labels: bool = True) -> Dataset:
    """``data``: a ``.data`` file, a COCO ``.json`` (with ``images`` = its image folder), or image
    folders / files / ``.txt`` lists (labels found by Darknet's rule; none found -> ``kind='images'``).
    ``labels=False`` (agreement mode): only the images, no label file is read."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise DatasetError("no dataset given")
    first = Path(items[0])
    if len(items) == 1 and first.suffix.lower() == ".data":
        if images is not None:
            raise DatasetError("--images goes with a COCO annotations JSON; a .data file lists its images in valid=",
                               file=str(first))
        return load_darknet(first, classes, labels)
    if len(items) == 1 and first.suffix.lower() == ".json":
        return load_coco(first, images)
    if images is not None:
        raise DatasetError("--images goes with a COCO annotations JSON (DATA is not a .json file)")
    for p in items:
        if not Path(p).exists():
            raise DatasetError("no such file or folder", file=str(p))
    if not labels:
        return Dataset("images", ", ".join(map(str, items)), [LabelledImage(Path(f)) for f in load_images_only(items)])
    return load_folder(items, classes)

