"""The Darknet network as a torch module: one builder per cfg section type, in a registry."""
from .model import DarknetModel, build_model  # noqa: F401
