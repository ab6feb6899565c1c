"""Runtime kernels in numpy: the fp16 lossless KV codec, KV dumps and the offline evaluator.

The codec's name and blob format version live here, importable without numpy (the pytest plugin's
header names them in every pytest run)."""

CODEC_NAME = "h2o-fp16-predictive"
FORMAT_VERSION = 1
