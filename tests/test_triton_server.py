"""A real Triton Inference Server (the tritonserver binary of nvidia-pytriton 0.7.0, CPU, python backend) on the
real yolov3-tiny: served detections equal `darkconv detect`'s, the runner spreads and retries over servers,
and start-up failures are one-line errors. Every server started here is stopped (fixtures and finally)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")

from darkconv.errors import DarkconvError, InferenceError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_root():
    """The bundled server, fetched once; skips only when it cannot be installed here."""
    from darkconv.serve import install_server, python_libdir

    try:
        python_libdir()
        return install_server(log=lambda *a, **k: None)
    except DarkconvError as e:
        if str(e).startswith("could not download") or "bundled Triton server is a Linux" in str(e) or \
                "shared library" in str(e) or "python backend stubs" in str(e):
            pytest.skip(f"the Triton server cannot be installed here: {e}")
        raise


@pytest.fixture(scope="module")
def repo(server_root, default_onnx, tmp_path_factory):
    from darkconv.export.triton import export_triton

    r = tmp_path_factory.mktemp("triton-repo")
    export_triton(default_onnx, r, name="yolo", platform="python", image_input="uint8", max_batch=4, threads=1)
    return r


def _server(repo, **kw):
    from darkconv.serve import TritonServer, free_ports

    h, g, m = free_ports(3)
    return TritonServer(repo, http_port=h, grpc_port=g, metrics_port=m, **kw)


@pytest.fixture(scope="module")
def server(repo):
    s = _server(repo)
    t0 = time.monotonic()
    try:
        s.start(timeout=300)
        s.startup_s = time.monotonic() - t0
        yield s
    finally:
        s.close()
    assert not s.alive()


@pytest.fixture(scope="module")
def reference(default_onnx, sample_images):
    """In-process ONNX Runtime detections and heads: what `darkconv detect MODEL.onnx` computes."""
    from darkconv.pipeline import detect_arrays, open_runner
    from darkconv.preprocess import preprocess_batch

    _, images = sample_images
    with open_runner(default_onnx) as r:
        dets = detect_arrays(r, images)
        x = preprocess_batch(images, (r.spec.width, r.spec.height), r.spec.letter_box)
        heads = [r.infer(x[i:i + 1]) for i in range(len(images))]
    return dets, heads


def _same(a, b):
    for f in ("boxes", "scores", "class_ids", "box_ids", "objectness"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def test_ensemble_detections_identical_to_detect(server, sample_images, reference):
    import tritonclient.http as http

    from darkconv.triton_models import unpack_detections

    files, _ = sample_images
    client = http.InferenceServerClient(server.url)
    for f, want in zip(files, reference[0]):
        data = np.fromfile(f, np.uint8)[None]
        inp = http.InferInput("IMAGE", list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        r = client.infer("yolo_detect", [inp])
        got = unpack_detections({k: r.as_numpy(k) for k in ("BOXES", "SCORES", "CLASS_IDS", "BOX_IDS",
                                                              "OBJECTNESS", "NUM_DETECTIONS")})
        assert len(got) == 1 and len(want) > 0
        _same(got[0], want)


def test_ensemble_empty_and_undecodable_images(server):
    import cv2
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from darkconv.triton_models import unpack_detections

    client = http.InferenceServerClient(server.url)
    ok, png = cv2.imencode(".png", np.full((100, 120, 3), 128, np.uint8))  # nothing to detect
    for data, want in ((png.reshape(1, -1), 0), (np.frombuffer(b"not an image", np.uint8).reshape(1, -1), None)):
        inp = http.InferInput("IMAGE", list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        if want is None:
            with pytest.raises(InferenceServerException, match="cannot decode the image"):
                client.infer("yolo_detect", [inp])
            continue
        r = client.infer("yolo_detect", [inp])
        got = unpack_detections({k: r.as_numpy(k) for k in ("BOXES", "SCORES", "CLASS_IDS", "BOX_IDS",
                                                              "OBJECTNESS", "NUM_DETECTIONS")})
        assert len(got) == 1 and len(got[0]) == want


def test_runner_refuses_batches_over_max_batch(server):
    from darkconv.runners.triton import TritonRunner

    with TritonRunner("yolo", server.url) as r:
        with pytest.raises(DarkconvError, match="at most 4 images per request"):
            r.infer(np.zeros((5, 3, 416, 416), np.float32))


def test_tensor_ensemble_and_runner_heads(server, sample_images, reference):
    import tritonclient.grpc as grpc

    from darkconv.preprocess import preprocess_batch
    from darkconv.runners.triton import TritonRunner
    from darkconv.triton_models import unpack_detections

    _, images = sample_images
    with TritonRunner("yolo", f"{server.url},{server.grpc_url}") as r:
        assert r.spec.classes == 80 and r.spec.source["precision"] == "fp32"
        x = preprocess_batch(images, (r.spec.width, r.spec.height), r.spec.letter_box)
        for i, want in enumerate(reference[1]):
            for got, w in zip(r.infer(x[i:i + 1]), want):
                np.testing.assert_array_equal(got, w)
        assert all(s["ok"] > 0 for s in r.stats().values())  # both protocols/servers were used
    client = grpc.InferenceServerClient(server.grpc_url.split("://")[1])
    sizes = np.array([[im.shape[1], im.shape[0]] for im in images], np.int64)
    a, b = grpc.InferInput("images", list(x[:4].shape), "FP32"), grpc.InferInput("IMAGE_SIZE", [4, 2], "INT64")
    a.set_data_from_numpy(x[:4])
    b.set_data_from_numpy(sizes[:4])
    res = client.infer("yolo_detect_tensors", [a, b])
    got = unpack_detections({k: res.as_numpy(k) for k in ("BOXES", "SCORES", "CLASS_IDS", "BOX_IDS", "OBJECTNESS",
                                                            "NUM_DETECTIONS")})
    for g, w in zip(got, reference[0][:4]):
        _same(g, w)


def test_cli_detect_on_server_equals_local(server, default_onnx, tmp_path):
    from darkconv.pipeline import DATA

    def run(*args):
        return subprocess.run([sys.executable, "-m", "darkconv", "detect", *args, "--batch", "2"], env=ENV,
                              capture_output=True, text=True, timeout=600)

    served = run("yolo", str(DATA), "--url", server.url, "--json", str(tmp_path / "a.json"))
    local = run(str(default_onnx), str(DATA), "--json", str(tmp_path / "b.json"))
    assert served.returncode == 0, served.stderr
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert "triton yolo @ http://" in served.stdout


def test_cli_bench_concurrency_on_server(server, tmp_path):
    out = subprocess.run([sys.executable, "-m", "darkconv", "bench", "yolo", "--url", server.url, "--iters", "4",
                          "--warmup", "1", "--concurrency", "1,3", "--json", str(tmp_path / "b.json")], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    import json

    row = json.loads((tmp_path / "b.json").read_text())["results"][0]
    assert [c["concurrency"] for c in row["concurrency"]] == [1, 3]
    assert all(c["iters"] == 4 and c["throughput_ips"] > 0 for c in row["concurrency"])
    assert "concurrent requests" in out.stdout and "triton yolo @ http://" in out.stdout


def test_taken_port_and_failing_model_are_one_line_errors(server, repo, tmp_path, monkeypatch):
    import shutil

    from darkconv.serve import ServerError, TritonServer

    s = TritonServer(repo, http_port=server.ports["http"], grpc_port=server.ports["grpc"] + 100,
                     metrics_port=server.ports["metrics"] + 100)
    with pytest.raises(ServerError, match=rf"port {server.ports['http']} \(http\) is already in use"):
        s.start()
    assert s.proc is None and s.log_path is None  # refused before anything was started or written
    import socket

    import darkconv.serve as sv

    # a plain listener (no SO_REUSEPORT, unlike Triton's own sockets) and no pre-check: the server must say so
    monkeypatch.setattr(sv, "port_free", lambda *a, **k: True)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    s = _server(repo)
    s.ports["http"] = holder.getsockname()[1]
    try:
        with pytest.raises(ServerError, match="a port is already in use") as e:
            s.start(timeout=300)
    finally:
        s.close()
        holder.close()
    monkeypatch.undo()
    assert "\n" not in str(e.value) and not s.alive()
    bad = tmp_path / "bad"
    shutil.copytree(repo / "yolo_post", bad / "yolo_post")
    (bad / "yolo_post" / "1" / "model.py").write_text("raise RuntimeError('broken on purpose')\n")
    s = _server(bad)
    try:
        with pytest.raises(ServerError) as e:
            s.start(timeout=300)
    finally:
        s.close()
    msg = str(e.value)
    assert "\n" not in msg and "model 'yolo_post' failed to load" in msg and "broken on purpose" in msg
    assert not s.alive()


def test_two_servers_one_killed_all_answered(repo, sample_images, reference):
    """A fleet of two; one is SIGKILLed mid-run: every batch is answered, correctly, exactly once.
    Then the last one is killed too: the rest fail with InferenceError, none lost or duplicated."""
    from concurrent.futures import ThreadPoolExecutor

    from darkconv.preprocess import preprocess_batch
    from darkconv.runners.triton import TritonRunner

    _, images = sample_images
    a, b = _server(repo), _server(repo)
    try:
        a.start(timeout=300)
        b.start(timeout=300)
        runner = TritonRunner("yolo", f"{a.url},{b.url}", cooldown=30)
        runner.activate()
        x = preprocess_batch(images, (runner.spec.width, runner.spec.height), runner.spec.letter_box)
        n = 40
        done = threading.Event()
        count = {"n": 0}
        lock = threading.Lock()

        def job(i):
            k = i % len(images)
            try:
                heads = runner.infer(x[k:k + 1])
                out = ("ok", all(np.array_equal(h, w) for h, w in zip(heads, reference[1][k])))
            except InferenceError as e:
                out = ("failed", str(e))
            with lock:
                count["n"] += 1
                if count["n"] == n // 4:
                    done.set()
            return i, out

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(job, i) for i in range(n)]
            done.wait(120)
            a.kill()  # mid-run, requests in flight
            results = [f.result() for f in futures]
        assert sorted(i for i, _ in results) == list(range(n))  # each exactly once
        assert all(out == ("ok", True) for _, out in results), [r for r in results if r[1] != ("ok", True)]
        stats = runner.stats()
        assert stats[f"http://{b.url}"]["ok"] > 0 and stats[f"http://{a.url}"]["ok"] > 0
        b.kill()
        with pytest.raises(InferenceError, match="failed after"):
            runner.infer(x[:1])
    finally:
        a.close()
        b.close()


def test_cli_serve_starts_and_stops_on_sigterm(repo, tmp_path):
    from darkconv.serve import free_ports

    h, g, m = free_ports(3)
    p = subprocess.Popen([sys.executable, "-m", "darkconv", "serve", str(repo), "--http-port", str(h),
                          "--grpc-port", str(g), "--metrics-port", str(m), "--timeout", "300"], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 300
        while "Triton ready" not in line and time.monotonic() < deadline and p.poll() is None:
            line = p.stdout.readline()
        assert "Triton ready" in line, line
        import urllib.request
        assert urllib.request.urlopen(f"http://127.0.0.1:{h}/v2/models/yolo/ready", timeout=10).status == 200
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=120)[0]
        assert p.returncode == 0 and "Triton server stopped (0)" in rest, rest
        out = subprocess.run(["pgrep", "-f", f"--http-port={h}"], capture_output=True, text=True)
        assert out.stdout.strip() == "", "a tritonserver process was left behind"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    bad = subprocess.run([sys.executable, "-m", "darkconv", "serve", str(tmp_path)], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "not a Triton model repository" in bad.stderr
