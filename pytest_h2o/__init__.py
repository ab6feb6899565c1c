"""pytest-h2o: gate KV-cache compression (H2O eviction + lossless codec) in CI."""

__version__ = "0.1.0"
