"""Running the grid on Ray: one task per backdoored model, one task per defense cell.

A cell task depends on its model's task (Ray passes the finished run directory along), so cells
start as soon as their model exists. ``ray.init(num_cpus=workers)`` starts a local cluster; with
``address`` the grid runs on an existing one (which must see the same files: OUT and the data).
A cell that raises, or whose worker dies (out of memory), is recorded as failed and the grid
goes on; tasks are never retried behind the user's back.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, TrojanPruneError
from ..progress import log
from .config import BenchConfig
from .grid import Cell, ModelJob, one_line_error

CONNECT_TIMEOUT_S = 5.0
OBJECT_STORE_BYTES = 128 * 2**20  # the tasks pass paths and small dicts, never tensors


def _worker_setup() -> None:
    import torch

    # Small models on shared cores: one thread per worker (a second one only waits on a core).
    torch.set_num_threads(1)


def _train_task(config: BenchConfig, job: ModelJob, path: str, data_dir) -> str:
    from .grid import train_model

    _worker_setup()
    return train_model(config, job, path, data_dir=data_dir)


def _cell_task(config: BenchConfig, cell: Cell, model_path: str, out: str, data_dir,
               reports: bool) -> dict:
    from .grid import report_hook_for, run_cell

    _worker_setup()
    hook = report_hook_for(out, data_dir) if reports else None
    return run_cell(config, cell, model_path, out, data_dir=data_dir, report_hook=hook)


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast with one clear line if a Ray head cannot be reached (ray.init would retry
    for minutes)."""
    if address == "auto":
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray-address must be HOST:PORT, ray://HOST:PORT or auto; got "
                          f"{address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TrojanPruneError(f"cannot reach the Ray cluster at {address} ({reason} within "
                               f"{timeout:.0f} s); start it with 'ray start --head' or drop "
                               f"--ray-address to run locally") from None


def init_ray(workers: int, address: str | None = None) -> bool:
    """Start (or join) Ray; returns True when this call started it (and should shut it down)."""
    import ray

    if address:
        check_address(address)
    if ray.is_initialized():
        log(f"running on Ray (already initialized, {int(ray.cluster_resources().get('CPU', 0))} "
            f"CPUs)")
        return False
    # Worker processes inherit the environment: keep their torch single-threaded from start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise TrojanPruneError(f"cannot connect to the Ray cluster at {address}: "
                                   f"{one_line_error(exc)}") from None
        log(f"running on Ray at {address} "
            f"({int(ray.cluster_resources().get('CPU', 0))} CPUs in the cluster)")
    else:
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 object_store_memory=OBJECT_STORE_BYTES, configure_logging=False)
        log(f"running on Ray with {workers} local worker{'s' if workers != 1 else ''}")
    return True


def run_on_ray(config: BenchConfig, cells: list[Cell], model_paths: dict[ModelJob, Path],
               out: str | Path, *, workers: int = 2, address: str | None = None, data_dir=None,
               reports: bool = False, on_record: Callable[[dict], None]) -> None:
    """Run ``cells`` (their models trained first where missing); ``on_record`` gets each
    cell's record as soon as it finishes, in completion order."""
    import ray

    started = init_ray(workers, address)
    try:
        gpu = 1 if config.device.startswith("cuda") else 0
        train_remote = ray.remote(num_cpus=1, num_gpus=gpu, max_retries=0)(_train_task)
        cell_remote = ray.remote(num_cpus=1, num_gpus=gpu, max_retries=0)(_cell_task)
        config_ref = ray.put(config)
        data_dir = str(data_dir) if data_dir is not None else None
        model_refs = {}
        for job in dict.fromkeys(cell.model for cell in cells):
            model_refs[job] = train_remote.remote(config_ref, job, str(model_paths[job]), data_dir)
        pending = {cell_remote.remote(config_ref, cell, model_refs[cell.model], str(out),
                                      data_dir, reports): cell for cell in cells}
        log(f"{len(cells)} cell(s), {len(model_refs)} backdoored model(s) to train or reuse")
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except Exception as exc:  # the worker died (OOM kill) or the model's training failed
                record = failed_record(cell, model_paths[cell.model], _ray_error(exc))
            done += 1
            on_record(record)
            status = record["status"]
            detail = (f"ASR {record['asr_before']:.1f} -> {record['asr_after']:.1f}, ACC "
                      f"{record['acc_before']:.1f} -> {record['acc_after']:.1f}"
                      if status == "ok" and record.get("asr_after") is not None
                      else record.get("error") or "")
            log(f"[{done}/{len(cells)}] {cell.label}: {status} in {record.get('seconds', 0):.1f} s"
                f" {detail}")
    finally:
        if started:
            ray.shutdown()


def _ray_error(exc: Exception) -> str:
    import ray

    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return "OutOfMemoryError: the worker ran out of memory and was killed"
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return "WorkerCrashedError: the worker process died (out of memory?)"
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        prefix = "training the backdoored model failed: " if "_train_task" in str(exc) else ""
        return prefix + one_line_error(cause)
    return one_line_error(exc)


def failed_record(cell: Cell, model_path, error: str) -> dict:
    from .grid import _versions

    return {"dataset": cell.dataset, "arch": cell.arch, "attack": cell.attack,
            "defense": cell.defense, "seed": cell.seed, "status": "failed", "error": error,
            "model_dir": str(model_path), "versions": _versions(), "seconds": 0.0,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
