"""Open a runtime by kind: the one place that knows every implementation."""

from __future__ import annotations

from typing import Callable

from h2o_kernels.runtimes.base import RUNTIMES, Runtime

IN_PROCESS = ("reference", "hf")  # runtimes that run a model in this process (logits, dumps, the fidelity suite)
DEVICES = ("cpu", "cuda")


class RuntimeUnavailableError(RuntimeError):
    """A runtime's optional dependencies are not installed, or its device is missing; the message says what to do."""


def open_runtime(kind: str, model: str = "smollm2", threads: int | None = 1, device: str = "cpu",
                 progress: Callable[[str], None] | None = None, model_option: str = "-m") -> Runtime:
    """Load ``model`` on the in-process runtime ``kind`` (:data:`IN_PROCESS`).

    ``model``: ``smollm2`` (the embedded SmolLM2-135M-Instruct GGUF, fetched once), a ``.gguf`` file, a
    HF-style ``config.json`` (random weights, for tests) or, on ``hf``, a transformers model folder.
    ``device`` is ``cpu`` or ``cuda`` (``hf`` only). Raises ``ModelSpecError`` / ``ModelFetchError`` for
    the model, :class:`RuntimeUnavailableError` when ``hf``'s extra (``pip install 'pytest-h2o[hf]'``) or
    the device is missing, ``ValueError`` for an unknown kind or device."""
    if kind not in IN_PROCESS:
        raise ValueError(f"runtime {kind!r}: expected one of {', '.join(RUNTIMES)} (in process: "
                         f"{', '.join(IN_PROCESS)})")
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if kind == "reference":
        if device != "cpu":
            raise ValueError(f"device {device!r}: the reference runtime runs on the CPU only (numpy); "
                             "use the hf runtime for cuda")
        from h2o_kernels.runtimes.reference import ReferenceRuntime

        return ReferenceRuntime.load(model, threads=threads, progress=progress, model_option=model_option)
    try:
        from h2o_kernels.runtimes.hf import HFRuntime
    except ImportError as exc:
        raise RuntimeUnavailableError(f"the hf runtime needs torch and transformers ({exc}): pip install "
                                      "'pytest-h2o[hf]' (on a CPU-only machine: pip install torch==2.13.0 first, "
                                      "or pip picks a CUDA build)") from None
    return HFRuntime.load(model, threads=threads, device=device, progress=progress, model_option=model_option)
