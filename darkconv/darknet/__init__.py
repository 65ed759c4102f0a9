"""Darknet file formats: cfg parsing, .weights I/O and the model spec (numpy only, no torch)."""
