"""Runtime kernels in numpy: the fp16 lossless KV codec, KV dumps and the offline evaluator.

The codec's name and blob format versions live here, importable without numpy (the pytest plugin's
header names them in every pytest run)."""

CODEC_NAME = "h2o-fp16-predictive"
FORMAT_VERSION = 3  # the fast profile's blob version (it still reads version 1)
PROFILE_VERSIONS = {"fast": 3, "ratio": 2}  # the blob version each codec profile writes
