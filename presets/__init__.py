"""Preset matrices (JSON) shipped with pytest-h2o; the original v4 set under its own file names."""
