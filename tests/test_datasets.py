"""darkconv.datasets: Darknet's label paths (src/utils.c), .data parsing, YOLO label files, COCO JSON."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from darkconv.datasets import (COCO_IDS, DatasetError, load_coco, load_dataset, map_coco_categories, read_data_file,
                               read_label_file, replace_image_to_label)
from darkconv.pipeline import DATA


# -- replace_image_to_label: expected values worked out by hand from src/utils.c ------------------------
@pytest.mark.parametrize("image, label", [
    ("/d/coco/images/train2017/1.jpg", "/d/coco/labels/train2017/1.txt"),
    ("/d/coco/images/val2017/1.jpg", "/d/coco/labels/val2017/1.txt"),
    ("/d/coco/images/train2014/1.jpg", "/d/coco/labels/train2014/1.txt"),
    ("/d/coco/images/val2014/1.jpg", "/d/coco/labels/val2014/1.txt"),
    ("/d/VOC2007/JPEGImages/000005.jpg", "/d/VOC2007/labels/000005.txt"),
    ("C:\\d\\images\\train2017\\1.jpg", "C:\\d\\labels\\train2017\\1.txt"),
    ("C:\\d\\images\\val2017\\1.jpg", "C:\\d\\labels\\val2017\\1.txt"),
    ("C:\\d\\images\\train2014\\1.jpg", "C:\\d\\labels\\train2014\\1.txt"),
    ("C:\\d\\images\\val2014\\1.jpg", "C:\\d\\labels\\val2014\\1.txt"),
    ("C:\\VOC\\JPEGImages\\1.jpg", "C:\\VOC\\labels\\1.txt"),
    # not mapped: other folder names, and no leading slash before images/ (find_replace needs "/images/...")
    ("/d/obj/img1.jpg", "/d/obj/img1.txt"),
    ("/d/images/img1.jpg", "/d/images/img1.txt"),
    ("images/val2017/1.jpg", "images/val2017/1.txt"),
    ("data/JPEGImages2/1.jpg", "data/JPEGImages2/1.txt"),
    # only the first occurrence of each folder is replaced
    ("/a/JPEGImages/b/JPEGImages/1.jpg", "/a/labels/b/JPEGImages/1.txt"),
    # every extension of Darknet's list, only at the end
    ("x.jpg", "x.txt"), ("x.JPG", "x.txt"), ("x.jpeg", "x.txt"), ("x.JPEG", "x.txt"), ("x.png", "x.txt"),
    ("x.PNG", "x.txt"), ("x.bmp", "x.txt"), ("x.BMP", "x.txt"), ("x.ppm", "x.txt"), ("x.PPM", "x.txt"),
    ("x.tiff", "x.txt"), ("x.TIFF", "x.txt"),
    ("a.jpg.png", "a.jpg.txt"), ("a.png.jpg", "a.png.txt"), ("/d/x.jpg/y.png", "/d/x.jpg/y.txt"),
    ("/d/x.jpg/y.jpg", "/d/x.jpg/y.txt"),
    # spaces / tabs at both ends are trimmed before the extension is replaced
    ("  /d/x.jpg \t", "/d/x.txt"),
])
def test_replace_image_to_label(image, label):
    assert replace_image_to_label(image) == label


@pytest.mark.parametrize("image", ["x.Jpg", "x.tif", "x.webp", "/d/x", "a.gif"])
def test_unknown_extension_is_an_error(image):
    with pytest.raises(DatasetError, match="cannot infer the label file name") as e:
        replace_image_to_label(image)
    assert image in str(e.value) and "\n" not in str(e.value)


# -- YOLO label files ---------------------------------------------------------------------------------
def test_read_label_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbf0 0.5 0.5 0.2 0.4\r\n\r\n  \n3\t0.1 0.9   1 0.05\n79 0 1 1e-3 1.0000001\n")
    truth, lines = read_label_file(p, 80)
    np.testing.assert_array_equal(truth.class_ids, [0, 3, 79])
    np.testing.assert_allclose(truth.boxes, [[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 1, 0.05], [0, 1, 1e-3, 1.0000001]],
                               rtol=1e-7)
    assert truth.boxes.dtype == np.float32
    np.testing.assert_array_equal(lines, [1, 4, 5])
    assert read_label_file(tmp_path / "missing.txt", 80) is None
    (tmp_path / "empty.txt").write_text("")
    assert len(read_label_file(tmp_path / "empty.txt", 80)[0]) == 0


@pytest.mark.parametrize("line, why", [
    ("0 0.5 0.5 0.2", "expected 5 values"),
    ("0 0.5 0.5 0.2 0.2 0.9", "expected 5 values"),
    ("1.0 0.5 0.5 0.2 0.2", "class id '1.0' is not an integer"),
    ("dog 0.5 0.5 0.2 0.2", "class id 'dog' is not an integer"),
    ("0 0.5 0,5 0.2 0.2", "coordinate '0,5' is not a number"),
    ("0 nan 0.5 0.2 0.2", "cx = nan is not finite"),
    ("0 0.5 0.5 inf 0.2", "w = inf is not finite"),
    ("0 1.2 0.5 0.2 0.2", "cx = 1.2 is outside"),
    ("0 0.5 -0.1 0.2 0.2", "cy = -0.1 is outside"),
    ("0 0.5 0.5 0 0.2", "w = 0 is outside"),
    ("0 0.5 0.5 0.2 1.5", "h = 1.5 is outside"),
    ("80 0.5 0.5 0.2 0.2", "class id 80 is outside 0..79"),
    ("-1 0.5 0.5 0.2 0.2", "class id -1 is outside"),
])
def test_bad_label_lines_name_file_and_line(tmp_path, line, why):
    p = tmp_path / "img.txt"
    p.write_text("0 0.5 0.5 0.2 0.2\n\n" + line + "\n")
    with pytest.raises(DatasetError) as e:
        read_label_file(p, 80)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: ") and why in msg and "\n" not in msg


# -- .data files --------------------------------------------------------------------------------------
def test_read_data_file_mirrors_read_data_cfg(tmp_path):
    p = tmp_path / "obj.data"
    p.write_text("# comment\n; other comment\n\nclasses = 2\nvalid = my list.txt\r\nvalid=second.txt\n"
                 " names\t= obj.names\n")
    opts = read_data_file(p)
    assert opts["classes"] == ("2", 4)
    assert opts["valid"] == ("mylist.txt", 5)          # every space removed, the first key wins
    assert opts["names"] == ("obj.names", 7)
    p.write_text("classes=2\nvalid\n")
    with pytest.raises(DatasetError, match=r"obj.data:2: expected key=value"):
        read_data_file(p)


def _layout(root: Path, kinds=("voc", "coco", "beside")) -> list[str]:
    """The bundled samples copied into Darknet's three label layouts; returns the image list lines."""
    stems = sorted(p.stem for p in DATA.glob("*.jpg"))
    lines = []
    for k, stem in enumerate(stems):
        kind = kinds[k % len(kinds)]
        img = {"voc": root / "VOC" / "JPEGImages" / f"{stem}.jpg",
               "coco": root / "coco" / "images" / "val2017" / f"{stem}.jpg",
               "beside": root / "obj" / f"{stem}.jpg"}[kind]
        lab = {"voc": root / "VOC" / "labels" / f"{stem}.txt",
               "coco": root / "coco" / "labels" / "val2017" / f"{stem}.txt",
               "beside": root / "obj" / f"{stem}.txt"}[kind]
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / f"{stem}.jpg", img)
        shutil.copy(DATA / f"{stem}.txt", lab)
        lines.append(str(img.relative_to(root)))
    shutil.copy(DATA / "coco.names", root / "coco.names")
    return lines


def test_load_darknet_layouts_and_missing_label(tmp_path, monkeypatch):
    lines = _layout(tmp_path)
    (tmp_path / "valid.txt").write_text("".join(line + "\n" for line in lines))   # relative, as Darknet opens them
    missing = tmp_path / lines[1].replace("images/val2017", "labels/val2017").replace(".jpg", ".txt")
    missing.unlink()
    (tmp_path / "obj.data").write_text("classes=80\nvalid=valid.txt\nnames=coco.names\n")
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("obj.data")
    assert ds.kind == "darknet" and len(ds.images) == 5 and not ds.notes
    assert ds.missing_labels == 1 and ds.images[1].truth is None
    for im, line in zip(ds.images, lines):
        want = DATA / (Path(line).stem + ".txt")
        if im.truth is None:
            continue
        np.testing.assert_allclose(im.truth.boxes, read_label_file(want)[0].boxes)
    assert [p.parts[-2] for p in (im.label_path for im in ds.images)] == ["labels", "val2017", "obj", "labels",
                                                                         "val2017"]
    ds.bind(80, None)
    assert ds.summary()["missing_labels"] == 1
    with pytest.raises(DatasetError, match="classes=80 but the model has 10 classes"):
        ds.bind(10, None)


def test_data_paths_relative_to_the_data_folder(tmp_path, monkeypatch):
    """Darknet opens paths relative to the current directory; darkconv falls back to the .data's folder, then
    its parent (data/obj.data in a darknet/ root), and says so."""
    root = tmp_path / "darknet"
    (root / "data").mkdir(parents=True)
    lines = _layout(root, kinds=("beside",))
    (root / "data" / "valid.txt").write_text("".join(l + "\n" for l in lines))
    (root / "data" / "obj.data").write_text("valid = data/valid.txt\nnames = coco.names\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ds = load_dataset(root / "data" / "obj.data")
    assert len(ds.images) == 5 and ds.missing_labels == 0
    assert ds.notes and str(root) in ds.notes[0]
    monkeypatch.chdir(root)                                # as Darknet runs it: no note
    ds = load_dataset("data/obj.data")
    assert ds.missing_labels == 0 and not ds.notes


@pytest.mark.parametrize("text, why", [
    ("names=coco.names\n", "no valid= line"),
    ("valid=valid.txt\n", "no names= line"),
    ("valid=nowhere.txt\nnames=coco.names\n", "valid=nowhere.txt not found"),
    ("valid=valid.txt\nnames=coco.names\ndifficult=dif.txt\n", "difficult= (VOC difficult objects) is not supported"),
    ("valid=valid.txt\nnames=none.names\n", "names=none.names not found"),
    ("classes=two\nvalid=valid.txt\nnames=coco.names\n", "classes=two is not an integer"),
    ("valid=empty.txt\nnames=coco.names\n", "the image list is empty"),
])
def test_bad_data_files(tmp_path, monkeypatch, text, why):
    lines = _layout(tmp_path, kinds=("beside",))
    (tmp_path / "valid.txt").write_text("".join(l + "\n" for l in lines))
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.data").write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as e:
        load_dataset("bad.data")
    msg = str(e.value)
    assert why in msg and ("bad.data" in msg or "empty.txt" in msg) and "\n" not in msg


def test_names_count_and_class_range_against_the_model(tmp_path, monkeypatch):
    lines = _layout(tmp_path, kinds=("beside",))
    (tmp_path / "valid.txt").write_text("".join(l + "\n" for l in lines))
    (tmp_path / "two.names").write_text("a\nb\n")
    (tmp_path / "obj.data").write_text("valid=valid.txt\nnames=two.names\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="the names file has 2 names but the model has 80 classes"):
        load_dataset("obj.data").bind(80, None)
    # labels with COCO class ids against a 2-class model: the first offending file:line (dog.txt line 2: dog = 16)
    (tmp_path / "obj.data").write_text("valid=valid.txt\nnames=two.names\nclasses=2\n")
    with pytest.raises(DatasetError) as e:
        load_dataset("obj.data").bind(2, None)
    assert str(e.value) == f"obj/dog.txt:2: class id 16 is outside 0..1 (the model has 2 classes)"


def test_folder_with_and_without_labels(tmp_path):
    ds = load_dataset([DATA])
    assert ds.kind == "darknet" and len(ds.images) == 5 and ds.objects() == 15
    for p in DATA.glob("*.jpg"):
        shutil.copy(p, tmp_path / p.name)
    ds = load_dataset([tmp_path])
    assert ds.kind == "images" and len(ds.images) == 5
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset([tmp_path / "nothing"])


# -- COCO annotations ---------------------------------------------------------------------------------
def coco_from_labels(images_dir: Path) -> dict:
    """A COCO annotations dict for the bundled samples, built from their YOLO labels (COCO's category ids)."""
    import cv2

    names = (DATA / "coco.names").read_text().split("\n")
    official = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant",
                "diningtable": "dining table", "tvmonitor": "tv"}
    doc = {"images": [], "annotations": [],
           "categories": [{"id": COCO_IDS[k], "name": official.get(n, n)} for k, n in enumerate(names[:80])]}
    for k, img in enumerate(sorted(images_dir.glob("*.jpg")), start=1):
        h, w = cv2.imread(str(img)).shape[:2]
        doc["images"].append({"id": 1000 + k, "file_name": img.name, "width": w, "height": h})
        truth, _ = read_label_file(DATA / f"{img.stem}.txt")
        for (cx, cy, bw, bh), c in zip(truth.boxes.astype(float), truth.class_ids):
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": 1000 + k,
                                       "category_id": COCO_IDS[int(c)], "bbox": box, "area": box[2] * box[3],
                                       "iscrowd": 0})
    return doc


def test_load_coco(tmp_path):
    doc = coco_from_labels(DATA)
    doc["annotations"].append({"id": 99, "image_id": 1001, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500,
                               "iscrowd": 1})
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(doc))
    ds = load_dataset(p, images=DATA)
    assert ds.kind == "coco" and len(ds.images) == 5 and ds.objects() == 15        # the crowd region left out
    ds.bind(80, (DATA / "coco.names").read_text().splitlines())
    assert ds.category_map == {cid: k for k, cid in enumerate(COCO_IDS)}           # by order: motorbike = motorcycle
    for im in ds.images:
        t, _ = read_label_file(DATA / f"{im.path.stem}.txt")
        np.testing.assert_array_equal(im.truth.class_ids, t.class_ids)
        np.testing.assert_allclose(im.truth.boxes, t.boxes, atol=1e-6)


def test_coco_category_mapping():
    cats = [{"id": 5, "name": "Dog"}, {"id": 9, "name": "traffic light"}]
    assert map_coco_categories(cats, ["cat", "dog", "traffic_light"]) == {5: 1, 9: 2}       # by name
    assert map_coco_categories(cats, ["a", "b"]) == {5: 0, 9: 1}                             # by order of id
    with pytest.raises(DatasetError, match="cannot map the 2 COCO categories to the model's 3 classes: Dog"):
        map_coco_categories(cats, ["a", "b", "c"])


@pytest.mark.parametrize("content, why", [
    ("[]", "it is a list (a COCO *results* file"),
    ('{"images": []}', "it has no 'annotations' list"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "images[0] needs"),
    ('{"images": [], "annotations": [], "categories": []}', "its 'categories' list is empty"),
    ('{"images": [{"id": 1, "file_name": "dog.jpg", "width": 768, "height": 576}], '
     '"annotations": [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}], "categories": [{"id": 1, "name": "a"}]}',
     "annotations[0] needs"),
    ('{"images": [{"id": 1, "file_name": "nope.jpg", "width": 8, "height": 8}], '
     '"annotations": [], "categories": [{"id": 1, "name": "a"}]}', "1 of the 1 images it lists are not in"),
    ('{"images": [', "not valid JSON"),
])
def test_bad_coco_files(tmp_path, content, why):
    p = tmp_path / "ann.json"
    p.write_text(content)
    with pytest.raises(DatasetError) as e:
        load_coco(p, DATA)
    assert why in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_coco_needs_images_and_images_needs_coco(tmp_path):
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(coco_from_labels(DATA)))
    with pytest.raises(DatasetError, match="needs --images DIR"):
        load_dataset(p)
    with pytest.raises(DatasetError, match="--images goes with a COCO annotations JSON"):
        load_dataset([DATA], images=DATA)
