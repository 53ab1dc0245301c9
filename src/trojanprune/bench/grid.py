"""The grid: cells = dataset x arch x attack x defense x seed.

Each backdoored model is trained (or reused) ONCE per (dataset, arch, attack, seed), as a run
directory ``OUT/models/<dataset>-<arch>-<attack>-seed<seed>`` (or an existing one under the
config's ``models_dir``); each defense cell then repairs a copy with
:func:`trojanprune.repair_run.repair_and_measure` and becomes one record of the results file.
"""

from __future__ import annotations

import json
import platform
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .config import BenchConfig, CleanSetting


@dataclass(frozen=True)
class ModelJob:
    dataset: str
    arch: str
    attack: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.dataset}-{self.arch}-{self.attack}-seed{self.seed}"


@dataclass(frozen=True)
class Cell:
    dataset: str
    arch: str
    attack: str
    defense: str
    seed: int

    @property
    def key(self) -> tuple:
        return (self.dataset, self.arch, self.attack, self.defense, self.seed)

    @property
    def model(self) -> ModelJob:
        return ModelJob(self.dataset, self.arch, self.attack, self.seed)

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.attack}/{self.defense}/seed{self.seed}"


def plan_cells(config: BenchConfig) -> list[Cell]:
    return [Cell(d, a, t, f, s) for d in config.datasets for a in config.archs
            for t in config.attacks for s in config.seeds for f in config.defenses]


def model_dir(config: BenchConfig, job: ModelJob, out: str | Path) -> Path:
    """Where the job's backdoored model is: a matching run in ``models_dir``, else under OUT."""
    reused = reusable_model(config, job)
    return reused if reused is not None else Path(out) / "models" / job.label


def reusable_model(config: BenchConfig, job: ModelJob) -> Path | None:
    """A run directory in ``models_dir`` made for this job, or None. One made for the same
    attack and seed under other training settings is an error (its numbers would not match
    the config), never silently used."""
    if not config.models_dir:
        return None
    path = Path(config.models_dir) / config.model_pattern.format(
        dataset=job.dataset, arch=job.arch, attack=job.attack, seed=job.seed)
    record_file = path / "run.json"
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    attack = record.get("attack") or {}
    if (record.get("dataset", {}).get("name") != job.dataset
            or record.get("model", {}).get("arch") != job.arch
            or attack.get("name") != job.attack or record.get("seed") != job.seed):
        return None
    trained = (record.get("training") or {}).get("config") or {}
    mismatch = [f"{k} {trained.get(k)} (config: {config.train[k]})" for k in ("epochs", "lr")
                if k in trained and config.train.get(k) is not None
                and float(trained[k]) != float(config.train[k])]
    rate = (record.get("poison") or {}).get("rate")
    if rate is not None and float(rate) != float(config.train["poison_rate"]):
        mismatch.append(f"poison_rate {rate} (config: {config.train['poison_rate']})")
    if attack.get("target") != config.train["target"]:
        mismatch.append(f"target {attack.get('target')} (config: {config.train['target']})")
    if mismatch:
        raise ConfigError(f"{path} (models_dir) was trained with {', '.join(mismatch)}; fix the "
                          f"config's train settings or models_dir so reused models match")
    return path


def check_models_dir(config: BenchConfig) -> None:
    """Validate every reusable model up front (before any work)."""
    if config.models_dir and not Path(config.models_dir).is_dir():
        raise ConfigError(f"models_dir {config.models_dir} does not exist")
    for cell in plan_cells(config):
        reusable_model(config, cell.model)


def train_model(config: BenchConfig, job: ModelJob, path: str | Path, data_dir=None) -> str:
    """Train the job's backdoored model into ``path`` unless a run is already there."""
    from ..experiment import make_backdoored_run
    from ..runs import is_run_dir

    path = Path(path)
    if is_run_dir(path):
        return str(path)
    t = config.train
    make_backdoored_run(job.attack, job.dataset, job.arch, path, epochs=t["epochs"],
                        poison_rate=t["poison_rate"], target=t["target"], mode=t["mode"],
                        seed=job.seed, lr=t["lr"], batch_size=t["batch_size"],
                        augment=t.get("augment"), train_size=t.get("train_size"),
                        image_size=t.get("image_size"),
                        attack_options=config.attack_options.get(job.attack),
                        model_kwargs=config.model_options.get(job.arch), data_dir=data_dir,
                        device=config.device, progress=False)
    return str(path)


def test_subset(test, n: int | None, seed: int = 0):
    """A fixed seeded subset of the test split (the same for every cell of a grid)."""
    if n is None or n >= len(test):
        return test
    import torch

    from ..utils import derive_seed

    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(
        derive_seed(seed, "bench-test-subset")))
    return test.subset(order[:n].sort().values)


def clean_for_cell(source, setting: CleanSetting, seed: int, data_dir=None):
    from ..repair_run import choose_clean

    if setting.data_free:
        return None
    return choose_clean(source, clean=setting.images if setting.per_class is None else None,
                        per_class=setting.per_class, data_free=False, seed=seed,
                        data_dir=data_dir)


def run_cell(config: BenchConfig, cell: Cell, model_path: str | Path, out: str | Path,
             data_dir=None, report_hook=None) -> dict:
    """Repair one cell's model; returns its complete record (status ok or failed, never
    raises for a problem of the cell itself)."""
    start = time.perf_counter()
    setting = config.clean_setting(cell.defense)
    options = dict(config.defense_options.get(cell.defense, {}))
    base = {"dataset": cell.dataset, "arch": cell.arch, "attack": cell.attack,
            "defense": cell.defense, "seed": cell.seed, "status": "failed", "error": None,
            "clean": setting.describe(), "clean_setting": setting.to_dict(),
            "requested_options": options, "model_dir": str(model_path),
            "versions": _versions(), "host": platform.node(), **_processor()}
    reset_peak_memory()
    try:
        import torch

        from .. import data
        from ..repair_run import repair_and_measure
        from ..sources import open_model
        from ..utils import resolve_device

        source = open_model(model_path)
        ds = source.dataset
        test = data.load_dataset(ds["name"], "test", data_dir=data_dir,
                                 image_size=ds.get("image_size"))
        test = test_subset(test, config.test_images)
        clean = clean_for_cell(source, setting, cell.seed, data_dir)
        device = resolve_device(config.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result, record = repair_and_measure(source, cell.defense, clean=clean, seed=cell.seed,
                                            options=options, test=test, device=device,
                                            progress=False)
        b, a = record["before"], record["after"]
        base.update({
            "status": "ok",
            "acc_before": b.get("acc"), "asr_before": b.get("asr"), "ra_before": b.get("ra"),
            "acc_after": a.get("acc"), "asr_after": a.get("asr"), "ra_after": a.get("ra"),
            "der": record.get("der"), "repair_seconds": record["seconds"],
            "evaluations": record["evaluations"], "pruned_count": record["pruned_count"],
            "total_units": record.get("total_units"), "verdict": record.get("verdict"),
            "clean_images": record["clean_images"], "test_images": len(test),
            "options": record.get("options"),
        })
        if device.type == "cuda":
            base["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if report_hook is not None:
            base["report"] = report_hook(cell, result, record)
    except Exception as exc:  # a cell's failure is recorded; the grid goes on
        base["error"] = one_line_error(exc)
        base["traceback"] = traceback.format_exc(limit=-4)[-2000:]
    base["seconds"] = round(time.perf_counter() - start, 3)
    base["peak_rss_mib"] = round(peak_memory_mib(), 1)
    base["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return base


def one_line_error(exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {message}"[:500]


def reset_peak_memory() -> None:
    """Start a new peak-RSS measurement (Linux resets VmHWM on writing 5 to clear_refs), so a
    reused worker process reports each cell's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _versions() -> dict:
    from ..runs import versions

    return versions()


def _processor() -> dict:
    from ..runs import processor

    return processor()


def report_hook_for(out: str | Path, data_dir=None):
    """A per-cell HTML report writer when ``trojanprune.report.write_report`` exists, else None."""
    try:
        from .. import report
    except ImportError:
        return None
    write_report = getattr(report, "write_report", None)
    if write_report is None:
        return None
    reports = Path(out) / "reports"

    def hook(cell: Cell, result, record) -> str | None:
        reports.mkdir(parents=True, exist_ok=True)
        path = reports / f"{cell.dataset}-{cell.arch}-{cell.attack}-{cell.defense}-seed{cell.seed}.html"
        try:
            write_report(path, result, record)
        except Exception as exc:  # a report is a nice-to-have; the cell's numbers stand
            return f"not written: {one_line_error(exc)}"
        return str(path)

    return hook
