"""``darkconv detect`` on videos (generated here), Ctrl-C / SIGTERM on a real subprocess, and the rough edges:
honest output lines, no empty --out folder, label layout, the print cap, --random-weights, --size errors,
--calib checks, ``python -m darkconv`` and the README's Python API."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from darkconv.cli import main
from darkconv.detect import Progress, label_style, layout_labels, plan_drawing
from darkconv.pipeline import DATA, detect_arrays, open_runner, resolve_names

ROOT = Path(__file__).resolve().parents[1]
DOG, PERSON = DATA / "dog.jpg", DATA / "person.jpg"


def dog_video(path, n=8, fps=10.0, size=(160, 120), codec="MJPG"):
    """A short pan over dog.jpg: real objects in every frame."""
    im = cv2.imread(str(DOG))
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
    assert w.isOpened()
    for i in range(n):
        x = (i * 6) % 160
        w.write(cv2.resize(im[:, x:x + 600], size))
    w.release()
    return path


def read_video(path):
    c = cv2.VideoCapture(str(path))
    assert c.isOpened(), path
    meta = (c.get(cv2.CAP_PROP_FPS), int(c.get(cv2.CAP_PROP_FRAME_WIDTH)), int(c.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    frames = []
    while True:
        ok, f = c.read()
        if not ok:
            break
        frames.append(f)
    c.release()
    return meta, frames


def temps(folder):
    return [p.name for p in Path(folder).iterdir() if ".darkconv-tmp-" in p.name]


@pytest.fixture(scope="module")
def runner(default_onnx):
    with open_runner(default_onnx, threads=2) as r:
        yield r


def test_video_annotated_and_darknet_frame_json(tmp_path, default_onnx, runner):
    src = dog_video(tmp_path / "in.avi", n=8, fps=10)
    out, js = tmp_path / "ann.mp4", tmp_path / "frames.json"
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(src), "--out", str(out), "--json", str(js),
                                  "--every", "2", "--threads", "2"])
    assert r.exit_code == 0, r.output
    (fps, w, h), frames = read_video(out)
    assert (len(frames), fps, w, h) == (4, 5.0, 160, 120)  # every 2nd frame; fps/2 keeps the duration
    entries = json.loads(js.read_text())
    assert [e["frame_id"] for e in entries] == [1, 3, 5, 7]  # the frame's number in the video, from 1
    assert all(list(e) == ["frame_id", "objects"] for e in entries)  # Darknet's demo: no filename
    # the oracle: the plain sequential path on the frames decoded independently here
    _, src_frames = read_video(src)
    names = resolve_names(runner.spec)
    for e, bgr in zip(entries, src_frames[::2]):
        d = detect_arrays(runner, [np.ascontiguousarray(bgr[:, :, ::-1])])[0]
        assert [o["class_id"] for o in e["objects"]] == d.class_ids.tolist() and len(d) > 0
        assert [o["name"] for o in e["objects"]] == [names[c] for c in d.class_ids]
        got = [[o["relative_coordinates"][k] for k in ("center_x", "center_y", "width", "height")]
               for o in e["objects"]]
        np.testing.assert_allclose(got, d.boxes, atol=1e-6)
        np.testing.assert_allclose([o["confidence"] for o in e["objects"]], d.scores, atol=1e-6)
    for drawn, orig in zip(frames, src_frames[::2]):  # drawn on, same picture underneath
        diff = np.abs(drawn.astype(int) - orig.astype(int)).max(axis=2)
        assert 0.01 < (diff > 80).mean() < 0.4
    assert f"{src}:1 (160x120):" in r.output and f"{src}:7 (160x120):" in r.output
    assert "done: 4 frame(s) on onnxruntime" in r.output
    assert f"wrote {out} (4 frames, 160x120, 5 fps" in r.output and f"wrote {js} (4 frame(s))" in r.output
    assert temps(tmp_path) == []


def test_video_max_frames_and_output_checks(tmp_path, default_onnx):
    src = dog_video(tmp_path / "in.avi", n=8)
    out = tmp_path / "a.avi"
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(src), "--out", str(out), "--max-frames", "3",
                                  "-q", "--threads", "2"])
    assert r.exit_code == 0, r.output
    (fps, w, h), frames = read_video(out)
    assert (len(frames), fps, w, h) == (3, 10.0, 160, 120)
    assert "(160x120):" not in r.output  # --quiet
    for bad, msg in [(tmp_path / "dir_out", "not a folder"), (src, "is the input video"),
                     (tmp_path / "x.webm", "an annotated video is written as")]:
        if bad.name == "dir_out":
            bad.mkdir()
        r = CliRunner().invoke(main, ["detect", str(default_onnx), str(src), "--out", str(bad)])
        assert r.exit_code == 1 and msg in r.stderr and r.stderr.count("\n") == 1, r.output
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(DOG), "--out", str(tmp_path / "v.mp4")])
    assert r.exit_code == 1 and "for images --out is a folder" in r.stderr
    assert not (tmp_path / "v.mp4").exists()


def test_camera_absent_and_video_with_images(tmp_path, default_onnx):
    r = CliRunner().invoke(main, ["detect", str(default_onnx), "0"])
    assert r.exit_code == 1
    assert r.stderr.startswith("darkconv: error: camera 0: no such camera") and r.stderr.count("\n") == 1
    mp4 = dog_video(tmp_path / "v.mp4", n=2, codec="mp4v")
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(DOG), str(mp4)])
    assert r.exit_code == 1 and "give one video, stream or camera at a time" in r.stderr
    assert "corrupt" not in r.output + r.stderr


def _start(args, tmp_path):
    """A real ``python -m darkconv`` with the default SIGINT handling (not inherited from a background shell)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "darkconv", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_interrupt_finishes_a_playable_video(tmp_path, default_onnx, sig, code, word):
    src = dog_video(tmp_path / "long.avi", n=400, size=(96, 72))
    out, js = tmp_path / "ann.mp4", tmp_path / "f.json"
    p = _start(["detect", str(default_onnx), str(src), "--out", str(out), "--json", str(js), "--threads", "1"],
               tmp_path)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until a few frames are done
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        if sum(":" in ln and "(96x72)" in ln for ln in seen) >= 3:
            break
    assert p.poll() is None, "".join(seen) + p.stderr.read()
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    m = re.match(rf"darkconv: error: {re.escape(word)} after (\d+) frame\(s\): wrote {re.escape(str(out))} "
                 r"\((\d+) frames, 96x72, 10 fps, mp4v\); wrote .*f\.json \((\d+) frame\(s\)\) \(complete files", last)
    assert m, last
    n = int(m.group(1))
    assert 3 <= n < 400 and int(m.group(2)) == n and int(m.group(3)) == n
    (fps, w, h), frames = read_video(out)  # playable: the MP4 index was written
    assert (len(frames), fps, w, h) == (n, 10.0, 96, 72)
    entries = json.loads(js.read_text())  # valid JSON with the same frames
    assert [e["frame_id"] for e in entries] == list(range(1, n + 1))
    assert "interrupted: " in stdout and temps(tmp_path) == []


def test_output_lines_are_honest_and_no_empty_out_folder(tmp_path, default_onnx):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not an image at all")
    out, js = tmp_path / "pred", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(bad), "--out", str(out), "--json", str(js)])
    assert r.exit_code == 2
    assert "wrote" not in r.output
    assert "no annotated images written" in r.output and f"{js} not written" in r.output
    assert not out.exists() and not js.exists()
    assert "1 of 1 image(s) could not be read" in r.stderr
    # a failure before any image (a model that cannot be opened) leaves no folder either
    import onnx

    m = onnx.load(str(default_onnx))
    del m.metadata_props[:]
    onnx.save(m, tmp_path / "foreign.onnx")
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "foreign.onnx"), str(DOG), "--out", str(out)])
    assert r.exit_code == 1 and not out.exists()
    # success: the folder as given, once (no "pred//")
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(DOG), "--out", f"{out}/", "--threads", "2"])
    assert r.exit_code == 0 and f"wrote 1 annotated image(s) in {out}/\n" in r.output, r.output
    assert "//" not in r.output


def test_print_cap_names_at_most_n_boxes(tmp_path, default_onnx):
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(DOG), "--print-max", "1", "--threads", "2"])
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if ln.startswith(str(DOG)))
    assert line.endswith(", ... and 3 more") and line.count(" 0.") == 2  # one box (car + truck) named
    assert "--print-max" in CliRunner().invoke(main, ["detect", "--help"]).output


def test_labels_never_overlap_and_stay_by_their_box(runner):
    names = resolve_names(runner.spec)
    for path in (DOG, PERSON):
        im = cv2.imread(str(path))[:, :, ::-1]
        d = detect_arrays(runner, [np.ascontiguousarray(im)])[0]
        h, w = im.shape[:2]
        _, _, items = plan_drawing(d, names, w, h)
        rects = [rect for _, _, _, rect in items]
        assert len(rects) == 4 and None not in rects, path  # every label drawn
        for i, a in enumerate(rects):
            assert 0 <= a[0] < a[2] <= w and 0 <= a[1] < a[3] <= h
            for b in rects[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (path, a, b)
        for (x1, y1, x2, y2), _, _, (lx1, ly1, lx2, ly2) in items:  # touching or inside its own box
            lh = ly2 - ly1
            assert x1 - (lx2 - lx1) <= lx1 <= x2 and y1 - 2 * lh <= ly1 <= y2 + lh
    # a crowd: 40 boxes at one place; every label that is drawn is free of the others
    boxes = [(100, 100, 200, 200)] * 40
    spots = layout_labels(boxes, [(60, 12)] * 40, (400, 300))
    placed = [(x, y, x + 60, y + 12) for s in spots if s for x, y in [s]]
    assert len(placed) >= 10
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_label_size_scales_with_the_image():
    from darkconv.detect import label_size

    small, big = label_style(768, 576), label_style(8000, 6000)
    assert big[0] >= 15 and big[2] >= 5  # box lines and text strokes both thick on a big image
    h_small = label_size("dog 0.81", *small[1:])[1]
    h_big = label_size("dog 0.81", *big[1:])[1]
    assert 0.02 <= h_big / 6000 <= 0.05 and 0.02 <= h_small / 576 <= 0.06  # a similar share of the image


def test_progress_status_lines_off_a_terminal(capsys):
    now = [0.0]
    p = Progress(100, "frame", tty=False, interval=5.0, clock=lambda: now[0])
    for _ in range(60):
        now[0] += 0.25  # 4 frames per second for 15 s
        p.update()
    p.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[0].startswith("darkconv: detect: 20 of 100 frames, 4.0 fps"), err


def test_random_weights_said_everywhere(tmp_path):
    cfg = ROOT / "cfg" / "yolov3-tiny.cfg"
    out, js = tmp_path / "pred", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["detect", str(cfg), str(DOG), "--random-weights", "--size", "128x96", "--out",
                                  str(out), "--json", str(js), "--threads", "2", "--print-max", "3"])
    assert r.exit_code == 0, r.output
    assert "darkconv: warning: --random-weights: RANDOM WEIGHTS" in r.stderr
    assert "with random weights" in r.output and "note: RANDOM WEIGHTS" in r.output
    entries = json.loads(js.read_text())
    assert entries and all(e["random_weights"] is True for e in entries)
    drawn = cv2.imread(str(out / "dog.jpg"))
    corner = drawn[-20:, :120]  # the banner: red text on white at the bottom left
    assert (corner.min(axis=2) > 240).mean() > 0.3 and ((corner[:, :, 2] > 200) & (corner[:, :, 0] < 80)).any()
    r = CliRunner().invoke(main, ["detect", str(cfg), str(DOG)])
    assert r.exit_code == 1 and "--random-weights" in r.stderr
    r = CliRunner().invoke(main, ["detect", str(DATA / "yolov4-tiny-10.cfg"), str(DATA / "x.weights"), str(DOG),
                                  "--random-weights"])
    assert r.exit_code == 1 and "not both" in r.stderr


def test_size_and_calib_errors_name_the_option(tmp_path, default_model):
    r = CliRunner().invoke(main, ["detect", str(default_model.cfg), str(default_model.weights), str(DOG),
                                  "--size", "500x500"])
    assert r.exit_code == 2 and "'--size'" in r.stderr and "multiples of 32" in r.stderr and "512x512" in r.stderr
    r = CliRunner().invoke(main, ["detect", str(default_model.cfg), str(default_model.weights), str(DOG),
                                  "--size", "big"])
    assert r.exit_code == 2 and "'--size'" in r.stderr and "expected WxH" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["convert", str(default_model.cfg), str(default_model.weights), "--precision",
                                  "int8", "--calib", str(empty), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 1 and f"--calib {empty}: no images" in r.stderr and r.stderr.count("\n") == 1
    assert "loaded" not in r.output and time.monotonic() - t0 < 5  # checked before the model is loaded


def test_python_m_darkconv():
    r = subprocess.run([sys.executable, "-m", "darkconv", "detect", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "Usage: darkconv detect" in r.stdout and "--every" in r.stdout


def test_readme_python_api_runs_as_written(tmp_path, default_model, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "cfg").symlink_to(ROOT / "cfg")  # as in a fresh clone's root
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "dog.jpg ['car', 'truck', 'bicycle', 'dog', 'car', 'truck']" in out
    assert (tmp_path / "random.weights").stat().st_size > 30e6


def test_lanes_for_files_one_lane_for_live_sources(tmp_path, default_onnx, default_model):
    """detect runs batches in lanes on files (throughput) and one at a time on a live source (latency);
    --lanes chooses, and is refused where the backend takes one call at a time."""
    from darkconv.detect import Detect

    src = dog_video(tmp_path / "in.avi", n=4, fps=10)
    for live, lanes, want in [(None, None, "2 lanes)"), (True, None, "(CPUExecutionProvider)"),
                              (None, 1, "(CPUExecutionProvider)"), (True, 3, "3 lanes)")]:
        job = Detect(default_onnx, None, [str(src)], live=live)
        report, where = job.run(threads=2, lanes=lanes, log=lambda *a: None, progress=False, quiet=True)
        assert where.endswith(want), (live, lanes, where)
        assert report.frames == 4 if not live else 1 <= report.frames <= 4  # live: busy-time frames are skipped
    r = CliRunner().invoke(main, ["detect", str(default_model.cfg), str(default_model.weights), str(DOG),
                                  "--lanes", "2"])
    assert r.exit_code != 0 and "--lanes applies to the onnxruntime backend, not torch" in r.output
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(DOG), "--lanes", "0"])
    assert r.exit_code == 2 and "--lanes" in r.output
