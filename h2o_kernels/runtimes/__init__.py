"""Runtimes behind one interface (:mod:`h2o_kernels.runtimes.base`): reference (numpy), hf (transformers),
llm-bench (an external binary)."""
