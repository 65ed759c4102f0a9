"""Darknet activations (src/activations.c, src/activations.h), as torch functions.

Element-wise ones map to standard ONNX ops where an equivalent exists (LeakyRelu,
Sigmoid, Relu, Tanh, Mish, ...); the rest are written with basic tensor ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mish(x):
    """x * tanh(softplus(x)); Darknet thresholds softplus at ±20 (MISH_THRESHOLD), where
    log1p(exp(x)) equals x (or exp(x)) to float32 precision, so torch's Mish (ONNX ``Mish``) is identical."""
    return F.mish(x)


def _hard_mish(x):
    return torch.where(x > 0, x, torch.where(x > -2, x * x / 2 + x, torch.zeros_like(x)))


def _stair(x):
    n = torch.floor(x)
    odd = torch.remainder(n, 2) != 0
    return torch.where(odd, (x - n) + torch.floor(x / 2), torch.floor(x / 2))


def _normalize_channels(x):  # NORM_CHAN: relu(x) / (eps + sum of positive values over channels)
    pos = torch.relu(x)
    return pos / (pos.sum(dim=1, keepdim=True) + 1e-4)


def _normalize_channels_softmax(x, use_max: bool):
    m = x.amax(dim=1, keepdim=True) if use_max else torch.zeros_like(x[:, :1])
    e = torch.exp(x - m)
    return e / (e.sum(dim=1, keepdim=True) + 1e-4)


ACTIVATIONS = {
    "linear": lambda x: x,
    "logistic": torch.sigmoid,
    "leaky": lambda x: F.leaky_relu(x, 0.1),
    "revleaky": lambda x: F.leaky_relu(x, 0.1),  # activate(): same forward as leaky
    "relu": torch.relu,
    # Darknet's CPU activate() has no RELU6 case (it returns 0); its CUDA kernel clamps to [0, 6]: we follow the GPU
    "relu6": lambda x: torch.clamp(x, 0, 6),
    "tanh": torch.tanh,
    "swish": lambda x: x * torch.sigmoid(x),
    "mish": _mish,
    "hard_mish": _hard_mish,
    "elu": lambda x: torch.where(x >= 0, x, torch.exp(x) - 1),
    "selu": lambda x: torch.where(x >= 0, 1.0507 * x, 1.0507 * 1.6732 * (torch.exp(x) - 1)),
    "gelu": lambda x: 0.5 * x * (1 + torch.tanh(0.797885 * x + 0.035677 * x * x * x)),
    "hardtan": lambda x: torch.clamp(x, -1, 1),
    "lhtan": lambda x: torch.where(x < 0, 0.001 * x, torch.where(x > 1, 0.001 * (x - 1) + 1, x)),
    "relie": lambda x: torch.where(x > 0, x, 0.01 * x),
    "ramp": lambda x: x * (x > 0).to(x.dtype) + 0.1 * x,
    "plse": lambda x: torch.where(x < -4, 0.01 * (x + 4), torch.where(x > 4, 0.01 * (x - 4) + 1, 0.125 * x + 0.5)),
    "stair": _stair,
    "loggy": lambda x: 2.0 / (1.0 + torch.exp(-x)) - 1,
    "normalize_channels": _normalize_channels,
    "normalize_channels_softmax": lambda x: _normalize_channels_softmax(x, False),
    "normalize_channels_softmax_maxval": lambda x: _normalize_channels_softmax(x, True),
}


class Activation(torch.nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def activation(section, key: str = "activation", default: str = "linear") -> Activation:
    """The section's activation, or a CfgError listing the ones Darknet knows."""
    name = section.str(key, default).lower()
    if name not in ACTIVATIONS:
        raise section.error(f"unknown activation {name!r}; Darknet's are: {', '.join(ACTIVATIONS)}", key)
    return Activation(name)
