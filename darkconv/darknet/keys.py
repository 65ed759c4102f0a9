"""The cfg keys Darknet's parser reads, per section (src/parser.c ``parse_*``, ``parse_net_options``).

Darknet marks every key it reads as used and, after each layer, prints ``Unused field`` for
the others (``option_unused``, src/option_list.c): a misspelt key is silently ignored and the
layer falls back to the default (``activaton=leaky`` gives a logistic conv with real weights).
darkconv splits the keys Darknet reads into

* ``USED``: keys darkconv reads (or refuses with an error when set, e.g. ``share_index``);
* ``IGNORED``: keys Darknet reads only for training, data augmentation, GPU scheduling or
  display; they do not change what a trained network computes at inference, so darkconv
  ignores them on purpose;

and reports anything else as an unknown key: a warning with file:line by default, an
error with ``strict=True`` (``--strict``).
"""
from __future__ import annotations

import contextlib
import difflib
import warnings

from ..errors import CfgError, DarkconvWarning

# parse_network_cfg_custom reads these for every layer section after its parse_* function
_LAYER_USED = {"dontload", "dontloadscales"}  # refused when set (load_weights_upto skips the layer)
_LAYER_IGNORED = {"clip", "onlyforward", "dont_update", "burnin_update", "stopbackward", "train_only_bn",
                  "learning_rate"}

_NET_IGNORED = {
    # optimisation and schedule
    "max_batches", "batch", "learning_rate", "learning_rate_min", "sgdr_cycle", "sgdr_mult", "momentum", "decay",
    "subdivisions", "time_steps", "track", "augment_speed", "sequential_subdivisions", "try_fix_nan",
    "weights_reject_freq", "equidistant_point", "badlabels_rejection_percentage", "num_sigmas_reject_badlabels",
    "ema_alpha", "use_cuda_graph", "loss_scale", "dynamic_minibatch", "optimized_memory",
    "workspace_size_limit_mb", "adam", "b1", "b2", "eps", "policy", "burn_in", "step", "scale", "steps", "scales",
    "seq_scales", "gamma", "power",
    # data augmentation and training crops
    "max_crop", "min_crop", "flip", "blur", "gaussian_noise", "mixup", "cutmix", "mosaic", "mosaic_bound",
    "contrastive", "contrastive_jit_flip", "contrastive_color", "unsupervised", "label_smooth_eps", "resize_step",
    "attention", "adversarial_lr", "angle", "aspect", "saturation", "exposure", "hue",
    # display only / non-image networks (darkconv needs width, height and channels)
    "max_chart_loss", "show_receptive_field", "inputs",
}

#: section type -> (keys darkconv reads, keys ignored on purpose); the layer-wide keys are added below
_TABLE: dict[str, tuple[set[str], set[str]]] = {
    "net": ({"width", "height", "channels", "letter_box"}, _NET_IGNORED),
    "convolutional": (
        {"filters", "groups", "size", "stride", "stride_x", "stride_y", "dilation", "antialiasing", "pad",
         "padding", "activation", "batch_normalize", "cbn", "flipped", "share_index", "binary", "xnor", "sway",
         "rotate", "stretch", "stretch_sway", "coordconv"},
        {"assisted_excitation", "bin_output", "dot", "angle", "grad_centr", "reverse", "stream", "wait_stream"}),
    "maxpool": ({"stride", "stride_x", "stride_y", "size", "padding", "maxpool_depth", "out_channels",
                 "antialiasing", "maxpool_zero_nonmax"}, set()),
    "local_avgpool": ({"stride", "stride_x", "stride_y", "size", "padding"}, set()),
    "avgpool": (set(), set()),
    "dropout": (set(), {"probability", "dropblock", "dropblock_size_rel", "dropblock_size_abs"}),
    "batchnorm": (set(), set()),
    "shortcut": ({"activation", "weights_type", "weights_normalization", "from"}, set()),
    "scale_channels": ({"from", "scale_wh", "activation"}, set()),
    "sam": ({"from", "activation"}, set()),
    "activation": ({"activation"}, set()),
    "upsample": ({"stride", "scale"}, set()),
    "route": ({"layers", "groups", "group_id"}, {"stream", "wait_stream"}),
    # reverse is Darknet's; flatten/extra are pjreddie's and refused by darkconv when set
    "reorg": ({"stride", "reverse", "flatten", "extra"}, set()),
    "reorg3d": ({"stride", "reverse", "flatten", "extra"}, set()),
    "connected": ({"output", "activation", "batch_normalize"}, set()),
    "softmax": ({"groups", "temperature", "tree"}, {"spatial", "noloss"}),
    "yolo": (
        {"classes", "num", "mask", "anchors", "scale_x_y", "new_coords", "nms_kind", "beta_nms"},
        {"max", "show_details", "max_delta", "counters_per_class", "label_smooth_eps", "objectness_smooth",
         "iou_normalizer", "obj_normalizer", "cls_normalizer", "delta_normalizer", "iou_loss", "iou_thresh_kind",
         "jitter", "resize", "focal_loss", "ignore_thresh", "truth_thresh", "iou_thresh", "random",
         "track_history_size", "sim_thresh", "dets_for_track", "dets_for_show", "track_ciou_norm",
         "embedding_layer", "map"}),
    "region": (
        {"coords", "classes", "num", "softmax", "anchors", "tree", "classfix"},
        # l.map (a class-id map file) is read by forward_region_layer's training branch only
        {"max", "log", "sqrt", "focal_loss", "jitter", "resize", "rescore", "thresh", "absolute", "map",
         "random", "coord_scale", "object_scale", "noobject_scale", "mask_scale", "class_scale", "bias_match"}),
    "empty": (set(), set()),
    "silence": (set(), set()),
    "implicit_add": ({"mean", "std", "filters", "atoms"}, set()),
    "implicit_mul": ({"mean", "std", "filters", "atoms"}, set()),
}

USED: dict[str, frozenset[str]] = {}
IGNORED: dict[str, frozenset[str]] = {}
for _type, (_used, _ignored) in _TABLE.items():
    _layer = _type != "net"
    USED[_type] = frozenset(_used | (_LAYER_USED if _layer else set()))
    IGNORED[_type] = frozenset((_ignored | (_LAYER_IGNORED if _layer else set())) - USED[_type])


_STRICT_DEFAULT = [False]  # process-wide default for strict=None (the CLI's --strict)


@contextlib.contextmanager
def strict_keys(enabled: bool = True):
    """Within the block, :func:`check_keys` with ``strict=None`` is strict (unknown keys are errors)."""
    before = _STRICT_DEFAULT[0]
    _STRICT_DEFAULT[0] = bool(enabled)
    try:
        yield
    finally:
        _STRICT_DEFAULT[0] = before


class UnknownKeyWarning(DarkconvWarning):
    """A cfg key Darknet does not read (it prints "Unused field" and ignores it)."""


def unknown_keys(section) -> list[str]:
    """Keys of ``section`` (a cfg Section) that Darknet's parser never reads, in file order."""
    known = USED.get(section.type, frozenset()) | IGNORED.get(section.type, frozenset())
    return [k for k in section.options if k not in known]


def _message(section, key: str) -> str:
    known = sorted(USED.get(section.type, frozenset()) | IGNORED.get(section.type, frozenset()))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key {key!r} in [{section.name}]{hint}: Darknet ignores it (\"Unused field\"), so it has no effect"


def check_keys(cfg, strict: bool | None = None) -> list[str]:
    """Warn (one :class:`UnknownKeyWarning` per key, with file:line) about keys Darknet does not read;
    with ``strict`` raise a :class:`CfgError` for the first one instead (``None``: the default set by
    :func:`strict_keys`). Returns the messages."""
    strict = _STRICT_DEFAULT[0] if strict is None else strict
    messages = []
    for section in [cfg.net, *cfg.layers]:
        for key in unknown_keys(section):
            err = section.error(_message(section, key), key)
            if strict:
                more = sum(len(unknown_keys(s)) for s in [cfg.net, *cfg.layers]) - 1
                tail = f"; {more} more unknown key{'s' if more != 1 else ''} in the cfg" if more else ""
                raise CfgError(f"{err.bare}; with --strict this is an error: fix or remove it{tail}",
                               file=err.file, line=err.line, layer=err.layer, section=err.section)
            messages.append(str(err))
            warnings.warn(UnknownKeyWarning(str(err)), stacklevel=2)
    return messages
