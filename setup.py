"""The C kernels of the fp16 codec (everything else is in pyproject.toml).

``_fastcore`` is the fast profile's single pass (plane split, centring, predictor estimates) and
``_ratiocore`` the ratio profile's context-model coder. Both use only integer arithmetic in what the
blob format depends on; floats are never contracted or reassociated, so every platform codes the
same bits. A compiler and Python's headers are needed to install from source.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:strict"]
else:
    FLAGS = ["-O3", "-std=c99", "-fno-fast-math", "-ffp-contract=off", "-fno-strict-aliasing"]

setup(ext_modules=[
    Extension("h2o_kernels.codec._fastcore", ["h2o_kernels/codec/_fastcore.c"], extra_compile_args=FLAGS),
    Extension("h2o_kernels.codec._ratiocore", ["h2o_kernels/codec/_ratiocore.c"], extra_compile_args=FLAGS),
])
