"""``trojanprune bench``: a grid of datasets x architectures x attacks x defenses x seeds.

    from trojanprune.bench import run_bench
    summary = run_bench("benchmarks/smoke.yaml", out="bench-out", workers=2)

Modules: :mod:`.config` (the YAML grid, validated up front), :mod:`.grid` (cells, training or
reusing each backdoored model once, repairing one cell), :mod:`.results` (the resumable
JSON Lines results file), :mod:`.ray_runner` (cells as Ray tasks), :mod:`.tables` (Markdown and
CSV tables) and :mod:`.plots` (PNG figures).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError
from ..progress import log
from .config import BenchConfig, CleanSetting, load_config, parse_config
from .grid import Cell, ModelJob, check_models_dir, model_dir, plan_cells
from .results import RESULTS_FORMAT, RESULTS_FORMAT_VERSION, ResultsFile, load_records


def check_data(config: BenchConfig, data_dir=None) -> None:
    """Every dataset loads and every attack builds with its options, before any training."""
    from .. import attacks, data

    problems = []
    for name in config.datasets:
        try:
            test = data.load_dataset(name, "test", data_dir=data_dir,
                                     image_size=config.train.get("image_size"))
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        except Exception as exc:  # DataError and friends: missing or malformed files
            problems.append(f"{name}: {exc}")
            continue
        for attack in config.attacks:
            try:
                attacks.create(attack, test.image_shape, test.num_classes,
                               target=config.train["target"], mode=config.train["mode"],
                               **config.attack_options.get(attack, {}))
            except Exception as exc:
                problems.append(f"attack {attack} on {name}: {exc}")
    if problems:
        raise ConfigError(f"{config.source or 'config'}: " + "; ".join(dict.fromkeys(problems)))


def select_cells(cells: list, only: dict[str, list], config: BenchConfig) -> list:
    """The cells whose coordinates are among ``only``'s values (every key must match)."""
    grid = {"dataset": config.datasets, "arch": config.archs, "attack": config.attacks,
            "defense": config.defenses, "seed": config.seeds}
    wanted = {}
    for key, values in only.items():
        if key not in grid:
            raise ConfigError(f"--only {key}=...: unknown key (valid: {', '.join(grid)})")
        valid = [str(v) for v in grid[key]]
        unknown = [str(v) for v in values if str(v) not in valid]
        if unknown or not values:
            raise ConfigError(f"--only {key}={','.join(map(str, values))}: "
                              f"{', '.join(unknown) or 'no value'} not in this grid's {key}s "
                              f"({', '.join(valid)})")
        wanted[key] = {str(v) for v in values}
    return [c for c in cells if all(str(getattr(c, key)) in values for key, values in wanted.items())]


def run_bench(config: str | Path | BenchConfig, out: str | Path, *, workers: int = 2,
              address: str | None = None, data_dir=None, retry_failed: bool = False,
              only: dict[str, list] | None = None, tables: bool = True,
              plots: bool = True) -> dict:
    """Run (or resume) a grid into ``out``; returns a summary dict.

    Cells already recorded as finished in ``out/results.jsonl`` are skipped; cells recorded
    as failed run again only with ``retry_failed``. ``only`` (e.g. ``{"arch": ["resnet20"]}``)
    runs part of the grid now and leaves the rest for a later call; the tables always cover
    every finished cell of the grid.
    """
    start = time.perf_counter()
    if not isinstance(config, BenchConfig):
        config = load_config(config)
    if address:
        from .ray_runner import check_address

        check_address(address)  # before anything is written
    # Ray workers need not share the driver's working directory: hand them absolute paths.
    if config.models_dir:
        config.models_dir = str(Path(config.models_dir).resolve())
    data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
    out = Path(out).expanduser().resolve()
    cells = plan_cells(config)
    selected = select_cells(cells, only or {}, config)
    check_models_dir(config)
    check_data(config, data_dir)
    results = ResultsFile(out, config)
    finished = results.finished()
    todo, skipped, failed_before = [], 0, 0
    for cell in selected:
        record = finished.get(cell.key)
        if record is None or (retry_failed and record.get("status") != "ok"):
            todo.append(cell)
        elif record.get("status") == "ok":
            skipped += 1
        else:
            failed_before += 1
    part = f" ({len(selected)} selected by --only)" if only else ""
    log(f"bench {config.name}: {len(cells)} cells{part}; {skipped} already finished, "
        f"{failed_before} failed before{' (pass --retry-failed to run them again)' if failed_before else ''}"
        f", {len(todo)} to run; results in {results.path}")
    if todo:
        from .grid import report_hook_for
        from .ray_runner import run_on_ray

        paths = {cell.model: model_dir(config, cell.model, out) for cell in todo}
        run_on_ray(config, todo, paths, out, workers=workers, address=address,
                   data_dir=data_dir, reports=report_hook_for(out) is not None,
                   on_record=results.append)
    records = [r for key, r in results.finished().items()
               if key in {c.key for c in cells}]
    written = []
    if tables and records:
        from .tables import write_tables

        written += write_tables(out, records, config.defenses, config.attacks)
    if plots and records:
        from .plots import write_plots

        written += write_plots(out, records)
    ran = len(todo)
    failed = [r for r in records if r.get("status") != "ok"]
    summary = {"cells": len(cells), "ran": ran, "skipped": skipped, "failed": len(failed),
               "results": str(results.path), "files": [str(p) for p in written],
               "seconds": round(time.perf_counter() - start, 1)}
    log(f"bench {config.name}: {len(records) - len(failed)} ok, {len(failed)} failed, ran {ran} "
        f"in {summary['seconds']:.0f} s; tables and plots in {out}")
    return summary


__all__ = ["BenchConfig", "CleanSetting", "Cell", "ModelJob", "load_config", "parse_config",
           "plan_cells", "run_bench", "load_records", "RESULTS_FORMAT", "RESULTS_FORMAT_VERSION"]
