"""Lossless KV compression around the codec: the runtime manager, KV dumps and the offline evaluator."""
