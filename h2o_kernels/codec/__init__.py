"""The fp16 predictive lossless codec: byte planes, per-block predictors, zstd, the blob format."""
