"""``darkconv eval`` on a model served by a real Triton server (the fixtures of test_triton_server start it)."""
from __future__ import annotations

import pytest

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")

import darkconv  # noqa: E402
from darkconv.pipeline import DATA  # noqa: E402

from test_triton_server import repo, server, server_root  # noqa: E402,F401  (module fixtures: a real server)

pytestmark = pytest.mark.slow


def test_served_model_agrees_with_its_cfg_and_scores_the_labels(server, default_model):
    """The served yolov3-tiny against torch on the cfg it came from: agreement 1.0; on the labels, the same
    Darknet figures as the local run."""
    r = darkconv.evaluate("yolo", None, DATA / "samples.data", url=server.url, ref="torch",
                          ref_model=default_model.cfg, ref_weights=default_model.weights, batch=2, coco=False)
    assert r.model["backend"] == "triton" and r.model["kind"] == "served" and "triton yolo" in r.model["runs_on"]
    assert r.figure == 1.0 and r.map.tp == 21 and r.map.fn == 0
    served = darkconv.evaluate("yolo", None, DATA / "samples.data", url=server.url, coco=False)
    local = darkconv.evaluate(default_model.cfg, default_model.weights, DATA / "samples.data", coco=False)
    assert [(c.ap, c.tp, c.fp) for c in served.map.classes] == [(c.ap, c.tp, c.fp) for c in local.map.classes]
