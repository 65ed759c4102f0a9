"""darkconv.sources: video files (generated here with cv2.VideoWriter), streams (a real local HTTP server),
cameras, image folders/lists; --every / --max-frames; what is a video (by content); one-line errors."""
from __future__ import annotations

import functools
import http.server
import shutil
import threading
import time

import cv2
import numpy as np
import pytest

from darkconv.errors import DarkconvError, ImageError
from darkconv.pipeline import DATA
from darkconv.sources import classify, open_source

#: containers this OpenCV build writes and reads back (checked: avc1/H.264 has no encoder here)
CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "mp4v"}


def level(i: int) -> int:
    """Frame i's grey level: frames are told apart by their mean."""
    return i * 12 + 16  # distinct up to frame 19 (FFmpeg shifts levels by ~4)


def make_video(path, n=20, fps=10.0, size=(64, 48)):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*CODECS[path.suffix]), fps, size)
    assert w.isOpened(), path
    for i in range(n):
        w.write(np.full((size[1], size[0], 3), level(i), np.uint8))
    w.release()
    return path


def frame_number(image) -> int:
    """Which generated frame an image is (by its mean level)."""
    m = image.mean()
    return min(range(20), key=lambda i: abs(level(i) - m))


@pytest.mark.parametrize("ext", sorted(CODECS))
def test_video_file_every_frame_in_order(tmp_path, ext):
    p = make_video(tmp_path / f"v{ext}", n=20, fps=10, size=(64, 48))
    with open_source(p) as src:
        assert (src.kind, src.fps, src.size, src.total) == ("video", 10.0, (64, 48), 20)
        frames = list(src)
    assert [f.index for f in frames] == list(range(20))
    assert [frame_number(f.image) for f in frames] == list(range(20))
    f = frames[3]
    assert f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 and f.path == p and f.fps == 10.0
    assert f.name == f"{p}:4"


def test_every_and_max_frames(tmp_path):
    p = make_video(tmp_path / "v.avi", n=20)
    with open_source(p, every=3) as src:
        assert src.total == 7
        got = [(f.index, frame_number(f.image)) for f in src]
    assert got == [(i, i) for i in range(0, 20, 3)]
    with open_source(p, every=3, max_frames=4) as src:
        assert src.total == 4
        assert [f.index for f in src] == [0, 3, 6, 9]
    with open_source(p, max_frames=5) as src:
        assert [f.index for f in src] == [0, 1, 2, 3, 4]
    with open_source(DATA, every=2, max_frames=2) as src:  # images: every N-th file
        assert src.kind == "images" and src.total == 2
        assert [(f.index, f.path.name) for f in src] == [(0, "dog.jpg"), (2, "giraffe.jpg")]
    with pytest.raises(DarkconvError, match="--every must be >= 1"):
        open_source(p, every=0)


def test_video_is_told_by_content_not_reported_as_a_corrupt_image(tmp_path):
    mp4 = make_video(tmp_path / "v.mp4")
    disguised = tmp_path / "clip.jpg"
    shutil.copy(mp4, disguised)
    assert classify(mp4) == "video" and classify(disguised) == "video"
    assert classify(DATA / "dog.jpg") == "images" and classify(DATA) == "images"
    with open_source(disguised) as src:
        assert src.kind == "video" and len(list(src)) == 20
    # a video inside an image list is named as a video, never "corrupt image"
    lst = tmp_path / "list.txt"
    lst.write_text(f"{DATA / 'dog.jpg'}\n{mp4}\n")
    with open_source(lst) as src:
        frames = list(src)
        assert frames[0].image.shape == (576, 768, 3)
        with pytest.raises(ImageError) as e:
            frames[1].image
    msg = str(e.value)
    assert msg.startswith(str(mp4)) and "is a video file, not an image" in msg and "corrupt" not in msg
    with pytest.raises(DarkconvError, match="give one video, stream or camera at a time"):
        open_source([DATA / "dog.jpg", mp4])


def test_unreadable_videos_are_one_line_errors_naming_the_file(tmp_path):
    good = make_video(tmp_path / "v.mp4").read_bytes()
    cases = {"missing.mp4": None, "empty.mp4": b"", "trunc.mp4": good[:len(good) // 2],
             "garbage.avi": np.random.default_rng(0).bytes(4000)}
    for name, data in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(ImageError) as e:
            open_source(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}: ") and "\n" not in msg, msg
    with pytest.raises(ImageError, match="video file not found"):
        open_source(tmp_path / "missing.mp4")
    with pytest.raises(ImageError, match="moov atom not found"):  # FFmpeg's own reason is kept
        open_source(tmp_path / "trunc.mp4")


def test_absent_camera_is_a_clear_error():
    t0 = time.monotonic()
    with pytest.raises(DarkconvError) as e:
        open_source("7")
    assert "camera 7: no such camera (/dev/video7 does not exist" in str(e.value)
    assert time.monotonic() - t0 < 2


def test_refused_stream_is_a_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"rtsp://127.0.0.1:{port}/live"
    with pytest.raises(DarkconvError) as e:
        open_source(url, open_timeout=3)
    msg = str(e.value)
    assert msg.startswith(f"stream {url}: cannot open the stream") and "refused" in msg.lower() and "\n" not in msg


@pytest.fixture()
def http_server(tmp_path):
    """A real HTTP server on loopback serving tmp_path (FFmpeg reads a video from it as a stream)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_stream_all_frames_or_live_skipping(tmp_path, http_server):
    make_video(tmp_path / "v.mp4", n=20)
    url = f"{http_server}/v.mp4"
    assert classify(url) == "stream"
    with open_source(url, live=False) as src:
        assert src.kind == "stream" and src.size == (64, 48) and src.total is None
        frames = list(src)
    assert [f.index for f in frames] == list(range(20))
    assert [frame_number(f.image) for f in frames] == list(range(20)) and frames[0].path is None
    with open_source(url) as src:  # live (Darknet's default for ://): a slow consumer skips frames
        got = []
        for f in src:
            got.append((f.index, frame_number(f.image)))
            time.sleep(0.05)
        dropped = src.dropped
    assert dropped > 0 and len(got) + dropped == 20
    assert [i for i, _ in got] == sorted({i for i, _ in got}) and all(i == n for i, n in got)
    assert got[0][0] == 0 and got[-1][0] == 19  # the newest frame is always delivered


def test_image_folder_frames_decode_lazily_and_report_bad_files(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(DATA / "dog.jpg", d / "a.jpg")
    (d / "b.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    cv2.imwrite(str(d / "c.png"), cv2.imread(str(DATA / "person.jpg")))
    with open_source(d) as src:
        assert (src.kind, src.total, src.fps, src.size) == ("images", 3, None, None)
        frames = list(src)
    assert [(f.index, f.path.name) for f in frames] == [(0, "a.jpg"), (1, "b.jpg"), (2, "c.png")]
    assert frames[0].image.shape == (576, 768, 3) and frames[2].image.shape == (424, 640, 3)
    assert np.array_equal(frames[0].image, cv2.imread(str(d / "a.jpg"))[:, :, ::-1])  # RGB
    with pytest.raises(ImageError, match=r"b\.jpg: cannot decode the image"):
        frames[1].image


def test_video_that_stops_early_says_so(tmp_path, default_onnx):
    from click.testing import CliRunner

    from darkconv.cli import main

    data = make_video(tmp_path / "v.avi", n=20, size=(160, 120)).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:len(data) // 2])
    with open_source(cut) as src:
        n = len(list(src))
    assert 0 < n < 20 and src.ended_early == n and src.frame_count == 20
    with open_source(tmp_path / "v.avi") as src:
        assert len(list(src)) == 20 and src.ended_early is None
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(cut), "-q", "--threads", "2"])
    assert r.exit_code == 0
    assert f"darkconv: warning: {cut}: decoding stopped after frame {n} of the 20 its header announces" in r.stderr
