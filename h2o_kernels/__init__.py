"""Runtime kernels in numpy: the fp16 lossless KV codec, KV dumps and the offline evaluator."""
