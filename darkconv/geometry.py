"""Where an image lands in the network input: the one letterbox geometry of pre- and postprocessing.

Darknet computes it twice with the same integer arithmetic: ``letterbox_image`` (src/image.c)
to place the resized image on the canvas, and ``correct_yolo_boxes`` (src/yolo_layer.c) to map
boxes back to the image. Both call :func:`letterbox_geometry`, so the two can never drift apart.
"""
from __future__ import annotations

import numpy as np

_F32 = np.float32


def c_div(a: int, b: int) -> int:
    """C integer division (truncation toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def letterbox_geometry(image_w: int, image_h: int, net_w: int, net_h: int) -> tuple[int, int, int, int]:
    """``(new_w, new_h, dx, dy)`` of Darknet's ``letterbox_image`` / ``correct_yolo_boxes``.

    ``new_*`` use integer arithmetic after a float32 aspect comparison
    (``(float)w/im.w < (float)h/im.h``); ``dx = (w-new_w)/2``, ``dy = (h-new_h)/2`` (C ints).
    """
    if (_F32(net_w) / _F32(image_w)) < (_F32(net_h) / _F32(image_h)):
        new_w, new_h = int(net_w), c_div(image_h * net_w, image_w)
    else:
        new_h, new_w = int(net_h), c_div(image_w * net_h, image_h)
    return new_w, new_h, c_div(net_w - new_w, 2), c_div(net_h - new_h, 2)
