"""The llm-bench runtime: the original's external MNN ``llm_bench`` binary behind the runtime interface.

Every :meth:`LlmBenchRun.run` is one call of the binary with the original's arguments
(:func:`llm_bench_command`: ``-kv true -p P -n G -rep R -fp LOG``), its table row parsed as the log parser
reads any llm_bench log. The binary feeds its own prompt (token 16 repeated), keeps no logits and writes no
KV dumps the online-sim can read, so its runs have speeds and the policies' metrics only.

Also here: how the original sweep wrote a point's config for llm_bench (:func:`sweep_config`, from the model's
base config, :func:`read_base_config`), which ``h2o-gate sweep`` shares.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from h2o_gates.log_parse import metric_row, parse_log_report
from h2o_kernels.runtimes.base import SYNTHETIC_TOKEN, ModelInfo, RunFailedError, RunResult, check_config
from h2o_presets.matrix import generated_config

KIND = "llm-bench"
LLM_BENCH_THREADS = 4  # the original sweep's -t
# run_h2o_v4_bench.py's model files (LlmConfig's names) and their defaults, in the order it normalises them
MODEL_FILE_DEFAULTS = {"llm_config": "llm_config.json", "llm_model": "llm.mnn", "llm_weight": "llm.mnn.weight",
                       "embedding_file": "embeddings_bf16.bin", "tokenizer_file": "tokenizer.txt",
                       "context_file": "context.json"}
TAIL_LINES = 5  # output lines a failure quotes
TAIL_CHARS = 600


def llm_bench_command(binary: str, threads: int, prompt_tokens: int, gen_tokens: int, repeat: int, config: Path,
                      log: Path, backend: str = "cpu", attention_option: int = 0) -> list[str]:
    """The original's llm_bench call for one workload: ``repeat`` measured runs after one discarded run, the
    table written to ``log``."""
    return [binary, "-m", str(config), "-a", backend, "-t", str(threads), "-qatten", str(attention_option),
            "-kv", "true", "-p", str(prompt_tokens), "-n", str(gen_tokens), "-rep", str(repeat), "-fp", str(log)]


def read_base_config(path: Path) -> dict[str, Any]:
    """The llm_bench base config with ``base_dir`` made absolute (MNN joins base_dir + file names);
    ValueError names the file when it is not a JSON object."""
    try:
        base = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(base, dict):
        raise ValueError(f"{path}: expected a JSON object")
    raw = base.get("base_dir", "")
    base_dir = Path(raw) if isinstance(raw, str) and raw else Path(".")
    if not base_dir.is_absolute():
        base_dir = Path(path).resolve().parent / base_dir
    base["base_dir"] = os.fspath(base_dir.resolve()) + os.sep
    return base


def sweep_config(base: dict[str, Any] | None, config: dict[str, Any]) -> dict[str, Any]:
    """One point's config file as run_h2o_v4_bench.py wrote it: the base config's keys in their order, every
    generated ``kv_*`` key (:func:`h2o_presets.matrix.generated_config`), then, with a base config, its model
    files relative to ``base_dir`` (MNN reads ``base_dir + field``) with the original's defaults filled in."""
    merged = {**(base or {}), **generated_config(config)}
    if base is not None:
        for key, default in MODEL_FILE_DEFAULTS.items():
            relative_model_path(merged, key, default)
    return merged


def relative_model_path(config: dict[str, Any], key: str, default: str) -> None:
    """Set ``config[key]`` (or ``default`` when absent) relative to ``config["base_dir"]``, as the original's
    ``normalize_mnn_path_field``; a non-string or empty value is left as it is."""
    raw = config.get(key, default)
    if not isinstance(raw, str) or not raw:
        return
    base_dir = Path(config["base_dir"]).resolve()
    config[key] = os.path.relpath((base_dir / raw).resolve(), base_dir).replace("\\", "/")


def _model_info(binary: str, base: dict[str, Any] | None) -> ModelInfo:
    """What can be known without running the binary: the name llm_bench prints (``base_dir``'s basename)
    and the size of the model and weight files; the layer sizes are the binary's business (None)."""
    if base is None:
        return ModelInfo(Path(binary).name, 0, None)
    files = sweep_config(base, {})
    base_dir = Path(files["base_dir"])
    size = 0
    for key in ("llm_model", "llm_weight"):
        if isinstance(files.get(key), str) and (base_dir / files[key]).is_file():
            size += (base_dir / files[key]).stat().st_size
    return ModelInfo(base_dir.name or Path(binary).name, size, None)


def _tail(output: str) -> str:
    """The last lines of a run's output on one line (``|`` between lines), at most :data:`TAIL_CHARS`."""
    lines = [line.strip() for line in output.splitlines() if line.strip()][-TAIL_LINES:]
    text = " | ".join(lines)
    return text if len(text) <= TAIL_CHARS else "..." + text[-TAIL_CHARS:]


class LlmBenchRun:
    """One configuration on the llm_bench binary (a :class:`~h2o_kernels.runtimes.base.ConfiguredRun`)."""

    def __init__(self, runtime: LlmBenchRuntime, config: dict[str, Any], source: str = "config") -> None:
        self.runtime = runtime
        self.config = config  # the config file's content (base config + generated kv_* keys)
        self.source = source

    def run(self, prompt: np.ndarray, continuation: np.ndarray, keep_logits: bool = False,
            dump_dir: Path | None = None, run_id: str = "run", step_delay_s: float = 0.0) -> RunResult:
        """Call the binary once with ``-p len(prompt) -n len(continuation)`` (it feeds its own prompt, token
        16 repeated, whatever the ids are) and return its table row's speeds and ``h2o_*`` metrics.

        Writes ``configs/<run_id>.json`` and, per call, ``llm_bench/<run_id>.run<n>.log`` (the table) and
        ``.stdout`` (stdout and stderr) under the runtime's work folder. Raises :class:`RunFailedError`
        naming the run and the end of the binary's output when it cannot be started, exits with an error
        or writes no table row; ``ValueError`` for what the binary cannot do: ``step_delay_s > 0`` (its
        decode loop is not ours), ``keep_logits`` or ``dump_dir``."""
        rt = self.runtime
        if step_delay_s > 0:
            raise ValueError(f"{self.source}: step_delay_s {step_delay_s:g}: the llm-bench runtime cannot slow its "
                             "decode steps (the external binary's decode loop is not ours); inject a slowdown "
                             "on an in-process runtime (reference, hf)")
        if keep_logits:
            raise ValueError(f"{self.source}: the llm-bench runtime keeps no logits (has_logits is False)")
        if dump_dir is not None:
            raise ValueError(f"{self.source}: the llm-bench runtime writes no KV dumps (has_dumps is False)")
        number = rt.calls[run_id] = rt.calls.get(run_id, 0) + 1
        config_path = rt.work_dir / "configs" / f"{run_id}.json"
        runs = rt.work_dir / "llm_bench"
        log, out = runs / f"{run_id}.run{number}.log", runs / f"{run_id}.run{number}.stdout"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        runs.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        log.unlink(missing_ok=True)
        command = llm_bench_command(rt.binary, rt.threads, len(prompt), len(continuation), rt.repeat, config_path,
                                    log, rt.backend, rt.attention_option)
        name = f"llm_bench run {run_id}"
        try:
            done = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", timeout=rt.timeout_s)
        except subprocess.TimeoutExpired as exc:
            output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output or ""
            out.write_text(output, encoding="utf-8")
            raise RunFailedError(f"{name} did not finish within {rt.timeout_s:g} s{self._ending(output, out)}") \
                from None
        except OSError as exc:
            raise RunFailedError(f"{name}: cannot start {rt.binary} ({exc.strerror or exc})") from None
        out.write_text(done.stdout, encoding="utf-8")
        if done.returncode != 0:
            status = (f"was killed by signal {-done.returncode}" if done.returncode < 0
                      else f"exited with status {done.returncode}")
            raise RunFailedError(f"{name} {status}{self._ending(done.stdout, out)}")
        rows, problems = parse_log_report(log) if log.is_file() else ([], [])
        if not rows:
            why = f" ({problems[0]})" if problems else ""
            raise RunFailedError(f"{name} wrote no table row to {log}{why}{self._ending(done.stdout, out)}")
        row = metric_row(rows[0])
        if "prefill_tps" not in row or "decode_tps" not in row:
            raise RunFailedError(f"{name}: its table row in {log} has no prefill<br>decode speed cell")
        metrics = {key: value for key, value in row.items() if key.startswith("h2o_")}
        return RunResult(row["prefill_tps"], row["decode_tps"], metrics, None, [])

    @staticmethod
    def _ending(output: str, path: Path) -> str:
        tail = _tail(output)
        return (f'; its output ends: "{tail}"' if tail else "; it printed nothing") + f" (output: {path})"


class LlmBenchRuntime:
    """The external llm_bench binary (a :class:`~h2o_kernels.runtimes.base.Runtime`, kind ``llm-bench``).

    ``base_config``: the model's llm_bench config (:func:`read_base_config`); every configured run's config
    file is it plus the configuration (:func:`sweep_config`). ``work_dir`` receives the config files and each
    call's table and output. ``threads`` is ``-t``; ``repeat`` is ``-rep``, the measured runs of one call
    (default 1: each :meth:`LlmBenchRun.run` is one measured run, the gate's rounds do the repeating)."""

    kind = KIND
    has_logits = False
    has_dumps = False

    def __init__(self, binary: str, base_config: Path | None, work_dir: Path, threads: int = LLM_BENCH_THREADS,
                 repeat: int = 1, backend: str = "cpu", attention_option: int = 0,
                 timeout_s: float | None = None) -> None:
        """ValueError naming the binary when it is not an executable (or a command on PATH), the base config
        when it is not a JSON object, or a count below 1."""
        if shutil.which(binary) is None:
            raise ValueError(f"llm-bench runtime: {binary}: not found or not executable; expected the path of an "
                             "llm_bench binary (or its name on PATH)")
        if threads < 1 or repeat < 1:
            raise ValueError(f"llm-bench runtime: threads {threads} and repeat {repeat} must be at least 1")
        self.binary = binary
        self.base = read_base_config(base_config) if base_config is not None else None
        self.work_dir = Path(work_dir)
        self.threads, self.repeat = threads, repeat
        self.backend, self.attention_option, self.timeout_s = backend, attention_option, timeout_s
        self.model = _model_info(binary, self.base)
        self.calls: dict[str, int] = {}  # calls so far by run id (each call's files are numbered)

    def text_ids(self, text: str | None, count: int, seed: int = 0) -> np.ndarray:
        """``count`` copies of token 16, whatever ``text`` is: llm_bench feeds its own prompt (that token
        repeated) and takes only the lengths from us, so these ids are what it really runs."""
        return np.full(count, SYNTHETIC_TOKEN, dtype=np.int64)

    def configure(self, config: dict[str, Any], source: str = "config", extra_kv_keys: Iterable[str] = (),
                  log: Callable[[str], None] | None = None) -> LlmBenchRun:
        """Raises ``ConfigError`` naming ``source`` and the key for a bad ``kv_*`` key (``extra_kv_keys``, the
        binary's own keys, go into the config file as they are). ``log`` is unused: the binary prints its own
        lines into its output file."""
        check_config(config, source, extra_kv_keys, runtime=KIND)
        return LlmBenchRun(self, sweep_config(self.base, config), source)

    def close(self) -> None:
        pass
