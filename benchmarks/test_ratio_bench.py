"""The ratio profile (blob version 2) against the fast profile on the same 192-token KV blocks.

Run with ``pytest benchmarks/test_ratio_bench.py`` (not part of the normal test run); one benchmark group
per kind holds both profiles' encode and decode, so their MB/s are compared within one run.
``extra_info`` records the ratio and MB/s (raw fp16 bytes; the mean over rounds). K uses RoPE matching
with SmolLM2's theta (1e5). ``H2O_BENCH_KV_DIR`` switches to real dumps (``benchmarks/conftest.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

from h2o_kernels.codec import profiles
from h2o_kernels.codec.ratio import RatioCodec
from h2o_kernels.codec.rope import RopeSpec

SEQ = 192
ROPE = RopeSpec(100000.0)


def _codec(profile: str, kind: str):
    if profile == "ratio":  # without the safety net: time the version-2 coder itself
        return RatioCodec(kind.lower(), rope=ROPE if kind == "K" else None, safety_net=False)
    return profiles.make_codec("fast", kind.lower())


@pytest.mark.parametrize("kind", ["K", "V"])
@pytest.mark.parametrize("profile", ["ratio", "fast"])
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_profile_speed(benchmark, kv_block, kind, profile, op):
    tensor, source = kv_block(SEQ, kind)
    codec = _codec(profile, kind)
    blob = codec.encode(tensor)
    benchmark.group = f"profiles seq={SEQ} {kind}"
    benchmark.name = f"{profile}-{op}"
    if op == "encode":
        assert benchmark(codec.encode, tensor) == blob
    else:
        back = benchmark(profiles.decode, blob)
        assert np.array_equal(back.view(np.uint16), tensor.view(np.uint16))
    benchmark.extra_info.update(source=source, raw_bytes=tensor.nbytes, blob_bytes=len(blob),
                                ratio=round(tensor.nbytes / len(blob), 4))
    mean = getattr(getattr(getattr(benchmark, "stats", None), "stats", None), "mean", None)
    if mean:  # None when benchmarking is disabled
        benchmark.extra_info["mb_s"] = round(tensor.nbytes / 1e6 / mean, 1)
