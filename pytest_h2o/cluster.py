"""Spread a gate's configurations over a Ray cluster (``--h2o-cluster ray://HOST:PORT`` or ``local:N``).

The points are split into groups, one per worker (a Ray actor; a node may hold several). Each worker opens
the runtime itself (:func:`~h2o_kernels.runtimes.registry.open_runtime` from the same :class:`RunSpec`: the
model from that node's own cache or a shared path, never weights sent through the driver) and measures its
group with :func:`~pytest_h2o.gate_run.measure_part`, the function a single-machine run calls with every
point: its own warm-up and interleaved baseline rounds, so each drop is against that worker's baseline and
speed is never compared across machines. Machine-independent numbers (lossy ratio, online-sim, fidelity)
do not depend on the worker.

Faults: a worker that dies (its process exits, its node disappears, or it sends no progress for
``H2O_CLUSTER_STALL_S`` seconds, default 1800) has its group measured again once on another live worker,
baseline included; when none is left, or the retry dies too, those configurations fail naming the worker,
node and reason. Nothing a dead worker measured is reported. Ctrl-C kills the workers, and the local
instance is shut down whatever happens. Imported only with ``--h2o-cluster``: without it Ray is never
imported.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from h2o_presets.matrix import Point
from pytest_h2o.gate_run import Progress, RunSpec, measure_part
from pytest_h2o.machine import machine_info

FORMS = "ray://HOST:PORT (a running Ray cluster) or local:N (a local Ray instance with N workers, N >= 1)"
RAY_INSTALL = 'pip install "pytest-h2o[ray]"'
START_TIMEOUT_S = 300.0  # for the workers to start (a node that installs nothing starts them in seconds)
FAULT_ENV = "H2O_CLUSTER_FAULT_RUN"  # N: worker 1's process exits after its Nth run (the fault test)
STALL_ENV = "H2O_CLUSTER_STALL_S"
_LOCAL = re.compile(r"local:([1-9][0-9]*)")
_RAY = re.compile(r"ray://[^\s:/]+:[0-9]{1,5}")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its worker names in error texts


class ClusterError(RuntimeError):
    """The cluster cannot be used (workers did not start, no live node); the message says which and why."""


@dataclass(frozen=True)
class Cluster:
    """Where to run: a Ray cluster's client address, or a local instance of ``workers`` workers."""

    address: str | None  # ray://HOST:PORT; None: start a local instance
    workers: int | None  # local:N


def parse_cluster(text: str) -> Cluster:
    """``ray://HOST:PORT`` or ``local:N``; ``ValueError`` naming both forms for anything else."""
    text = text.strip()
    if (match := _LOCAL.fullmatch(text)) is not None:
        return Cluster(None, int(match.group(1)))
    if _RAY.fullmatch(text) is not None:
        return Cluster(text, None)
    raise ValueError(f"expected {FORMS}, got {text!r}")


def split(points: list[Point], workers: int) -> list[list[Point]]:
    """``points`` dealt round-robin to at most ``workers`` groups (none empty), each keeping the preset's order."""
    return [group for group in (points[i::workers] for i in range(workers)) if group]


class Worker:
    """One Ray actor: measures the groups it is sent on its node, sending progress lines to the driver."""

    def __init__(self, number: int, queue: Any) -> None:
        import ray

        self.number, self.queue = number, queue
        self.info = {"worker": number, "ip": ray.util.get_node_ip_address(), "machine_info": machine_info()}

    def describe(self) -> dict[str, Any]:
        return self.info

    def measure(self, points: list[Point], spec: RunSpec, folder: str, exit_after_runs: int = 0) -> dict[str, Any]:
        """:func:`measure_part` of ``points`` in ``spec.out_dir/workers/<folder>`` when the driver's run folder is
        reachable here (same node or a shared path), else in a temporary folder of this node."""
        out = spec.out_dir / "workers" / folder if spec.out_dir.is_dir() else \
            Path(tempfile.gettempdir()) / "h2o-ray" / spec.out_dir.name / folder
        out.mkdir(parents=True, exist_ok=True)
        runs = 0

        def progress(line: str) -> None:
            nonlocal runs
            self.queue.put((self.number, line))
            runs += line.startswith("round ")
            if exit_after_runs and runs >= exit_after_runs:
                os._exit(1)  # the fault test: this worker's process dies mid-run

        part = measure_part(points, replace(spec, out_dir=out), progress)
        return {**part, **self.info, "out_dir": str(out)}


def measure_on_cluster(points: list[Point], spec: RunSpec, progress: Progress) -> list[dict[str, Any]]:
    """Measure ``points`` on the cluster ``spec.cluster``; one part per group (:func:`measure_part`'s dict plus
    ``worker``, ``ip``, ``machine_info``, ``out_dir``, and ``note``/``error`` for a retried or failed group)."""
    import ray

    cluster = parse_cluster(str(spec.cluster))
    spec = _portable(spec)
    # Ray puts the driver's current folder on its workers' Python path: started from a source checkout of
    # pytest-h2o, they would import its uncompiled h2o_kernels instead of the installed one. The driver imports
    # nothing from there (it runs the installed package), so neither may the workers: start Ray from elsewhere.
    here = os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        if cluster.address is None:
            ray.init(num_cpus=cluster.workers, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        else:
            ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"--h2o-cluster {spec.cluster}: cannot connect: {_reason(exc)} (is the cluster up and "
                           f"its client server listening, with ray[client] installed on both sides; does "
                           f"RAY_AUTH_MODE match the cluster's? see the README's Ray section)") from None
    finally:
        os.chdir(here)
    try:
        parts = _Driver(ray, cluster, spec, progress).run(points)
        return sorted(parts, key=lambda part: part["worker"])
    finally:
        ray.shutdown()  # a local instance stops; a client disconnects and its workers go with it


def _portable(spec: RunSpec) -> RunSpec:
    """``spec`` with its paths relative to this folder made absolute (workers start elsewhere)."""
    paths: dict[str, Any] = {name: Path(value).resolve() for name in ("out_dir", "text_file", "kv_dumps", "base_config")
                             if (value := getattr(spec, name)) is not None}
    model = Path(spec.model)
    if not model.is_absolute() and model.exists():
        paths["model"] = str(model.resolve())
    return replace(spec, **paths)


class _Driver:
    """Starts the workers, deals the groups, relays progress, and handles deaths and Ctrl-C."""

    def __init__(self, ray: Any, cluster: Cluster, spec: RunSpec, progress: Progress) -> None:
        self.ray, self.cluster, self.spec, self.progress = ray, cluster, spec, progress
        self.stall_s = float(os.environ.get(STALL_ENV) or 1800.0)
        self.exit_after = int(os.environ.get(FAULT_ENV) or 0)
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.dead: dict[int, str] = {}  # worker index -> why
        self.heard: dict[int, float] = {}  # worker index -> when it last sent a line
        self.tasks: dict[Any, tuple[int, list[Point], str | None]] = {}  # ref -> (worker index, group, retry note)
        self.submitted = 0

    def run(self, points: list[Point]) -> list[dict[str, Any]]:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._start_workers()
        parts: list[dict[str, Any]] = []
        try:
            for index, group in enumerate(split(points, len(self.actors))):
                self._submit(index, group, None, exit_after=self.exit_after if index == 0 else 0)
            while self.tasks:
                ready, _ = self.ray.wait(list(self.tasks), num_returns=1, timeout=1.0)
                self._relay()
                for ref in ready:
                    parts += self._collect(ref)
                self._check_stalls()
            self._relay()
        except KeyboardInterrupt:
            self.progress("interrupted: cancelling the remote work")
            for ref in self.tasks:
                self._quietly(self.ray.cancel, ref)
            for actor in self.actors:
                self._quietly(self.ray.kill, actor)
            raise
        return parts

    def _start_workers(self) -> None:
        ray = self.ray
        actor_class = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(Worker)
        if self.cluster.address is None:
            options: list[dict[str, Any]] = [{} for _ in range(int(self.cluster.workers or 1))]
        else:  # one worker per live node: each machine's speed is measured with the machine to itself
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            nodes = [node for node in ray.nodes() if node.get("Alive")]
            if not nodes:
                raise ClusterError(f"--h2o-cluster {self.cluster.address}: the cluster has no live node")
            options = [{"scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)}
                       for node in nodes]
        self.actors = [actor_class.options(**opts).remote(number, self.queue)
                       for number, opts in enumerate(options, start=1)]
        try:
            self.infos = ray.get([actor.describe.remote() for actor in self.actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"--h2o-cluster {self.spec.cluster}: {len(self.actors)} workers did not start within "
                               f"{START_TIMEOUT_S:.0f} s (not enough free CPUs on the cluster?)") from None
        now = time.monotonic()
        self.heard = {index: now for index in range(len(self.actors))}
        for info in self.infos:
            m = info["machine_info"]
            self.progress(f"Ray {ray.__version__}: worker {info['worker']} on node {m['node']} ({info['ip']}): "
                          f"{m['cpu']['brand']}, {m['cpu']['count']} CPUs, {m['system']} {m['release']}, "
                          f"{m['python_implementation']} {m['python_version']}")

    def _submit(self, index: int, group: list[Point], note: str | None, exit_after: int = 0) -> None:
        self.submitted += 1
        folder = f"worker{index + 1}" if note is None else f"worker{index + 1}-task{self.submitted}"
        ref = self.actors[index].measure.remote(group, self.spec, folder, exit_after)
        self.tasks[ref] = (index, group, note)
        self.heard[index] = time.monotonic()

    def _collect(self, ref: Any) -> list[dict[str, Any]]:
        """The part of a finished task; a dead worker's group is retried once elsewhere or failed."""
        index, group, note = self.tasks.pop(ref)
        exceptions = self.ray.exceptions
        try:
            part = self.ray.get(ref)
        except exceptions.RayActorError as exc:
            why = self.dead.setdefault(index, _reason(exc))
            return self._worker_died(index, group, note, why)
        except exceptions.RayTaskError as exc:  # the measurement itself raised: the same on any worker
            return [self._failed(index, group, f"{_where(self.infos[index])}: {_reason(exc)}", note)]
        for row in part["configs"].values():
            row["measured_by"] = _where(self.infos[index])
        return [{**part, **({"note": note} if note else {})}]

    def _worker_died(self, index: int, group: list[Point], note: str | None, why: str) -> list[dict[str, Any]]:
        died = f"{_where(self.infos[index])} died ({why})"
        alive = [i for i in range(len(self.actors)) if i not in self.dead]
        if note is not None or not alive:
            reason = f"{died}{'; retried once already: ' + note if note else '; no other worker left to retry on'}"
            self.progress(f"{len(group)} configuration{'s' if len(group) != 1 else ''} not measured: {reason}")
            return [self._failed(index, group, reason, note)]
        busy = {i: sum(1 for task in self.tasks.values() if task[0] == i) for i in alive}
        target = min(alive, key=lambda i: (busy[i], i))
        retry = f"retried on worker {target + 1} after {died}"
        self.progress(f"{died}: its {len(group)} configuration{'s' if len(group) != 1 else ''} "
                      f"({', '.join(p.label for p in group)}) run again on worker {target + 1}, "
                      "baseline measured again there")
        self._submit(target, group, retry)
        return []

    def _failed(self, index: int, group: list[Point], reason: str, note: str | None) -> dict[str, Any]:
        return {**self.infos[index], "model": None, "warnings": [], "out_dir": None, "error": reason,
                **({"note": note} if note else {}), "baselines": {p.label: None for p in group},
                "configs": {p.label: {"run_id": p.run_id, "error": reason} for p in group}}

    def _relay(self) -> None:
        """The workers' progress lines so far, on the driver's terminal."""
        while not self.queue.empty():
            number, line = self.queue.get_nowait()
            self.heard[number - 1] = time.monotonic()
            info = self.infos[number - 1]
            self.progress(f"node {info['ip']} worker {number}: {line}")

    def _check_stalls(self) -> None:
        """A worker busy but silent for ``stall_s`` is killed (its task then fails as a death: retried or failed)."""
        now = time.monotonic()
        for index in {task[0] for task in self.tasks.values()} - set(self.dead):
            if now - self.heard[index] > self.stall_s:
                self.dead[index] = f"no progress for {self.stall_s:g} s ({STALL_ENV})"
                self.ray.kill(self.actors[index], no_restart=True)

    @staticmethod
    def _quietly(action: Any, target: Any) -> None:
        try:
            action(target)
        except Exception:  # noqa: BLE001 - best effort while interrupting: the instance is shut down next
            pass


def _where(info: dict[str, Any]) -> str:
    return f"worker {info['worker']} on node {info['machine_info']['node']} ({info['ip']})"


def _reason(exc: BaseException) -> str:
    """A Ray error in one line (they run to many): a task's own exception as ``Type: message``; a dead actor's
    first line with its process id and Ray's exit type and detail; at most 300 characters."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return _ANSI.sub("", f"{type(cause).__name__}: {cause}")[:300]
    text = _ANSI.sub("", str(exc))
    first = next((line.strip().rstrip(".") for line in text.splitlines() if line.strip()), type(exc).__name__)
    found = [f"{name} {m.group(1).strip()}" for name, pattern in (("pid", r"\bpid: (\d+)"),
                                                                  ("exit type", r"Worker exit type: (\w+)"),
                                                                  ("exit detail", r"Worker exit detail: ([^.]*)"))
             if (m := re.search(pattern, text)) is not None]
    return (first + (f"; {', '.join(found)}" if found else ""))[:300]
