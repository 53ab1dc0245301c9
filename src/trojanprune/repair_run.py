"""A whole repair as the CLI and the benchmarks run it: pick the defender's clean data from the
training split, repair, measure before and after (when the trigger is known), save."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from . import data, metrics
from .defenses import get as get_defense
from .engine import discover_units
from .errors import ConfigError
from .progress import log
from .repair import repair
from .runs import save_run
from .sources import ModelSource


def choose_clean(source: ModelSource, *, clean: int | None, per_class: int | None,
                 data_free: bool, seed: int, data_dir=None):
    """The defender's clean images, drawn from the TRAINING split (never test), seeded."""
    if data_free:
        return None
    if clean is not None and per_class is not None:
        raise ConfigError("pass either --clean N or --per-class K, not both")
    ds = source.dataset
    train = data.load_dataset(ds["name"], "train", data_dir=data_dir, image_size=ds.get("image_size"))
    if per_class is not None:
        return data.clean_subset(train, per_class=per_class, seed=seed)
    return data.clean_subset(train, n=500 if clean is None else clean, seed=seed)


def repair_and_measure(source: ModelSource, method: str, *, clean=None, seed: int = 0,
                       options: dict | None = None, test=None, device="cpu",
                       progress: bool = True) -> tuple[object, dict]:
    """Repair ``source.model`` and return (result, record with metrics before/after and DER)."""
    if clean is None and get_defense(method).needs_data:
        raise ConfigError(f"method {method!r} needs clean data; drop --data-free")
    before = metrics.evaluate(source.model, test, source.attack) if test is not None else {}
    result = repair(source.model, clean, method=method, seed=seed, device=device,
                    progress=progress, **(options or {}))
    after = metrics.evaluate(result.model.cpu(), test, source.attack) if test is not None else {}
    record = {"method": method, "seed": seed, "clean_images": 0 if clean is None else len(clean),
              "before": _round(before), "after": _round(after),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "environment": environment(device),
              **{k: v for k, v in result.to_dict().items() if k not in ("method", "seed")}}
    if "asr" in before and "asr" in after:
        record["der"] = round(100 * metrics.der(before["acc"] / 100, after["acc"] / 100,
                                                before["asr"] / 100, after["asr"] / 100), 4)
    return result, record


def environment(device) -> dict:
    """What, besides the seed and the code, can decide a repair's outcome: a rerun is
    guaranteed the same pruning only on the same torch version, device, CPU and thread count
    (floating-point sums may run in another order, and ONP's agent can amplify a difference
    in the last digit into another pruning)."""
    from . import __version__
    from .runs import processor

    return {"trojanprune": __version__, "commit": source_commit(), "torch": torch.__version__,
            "device": str(device), **processor(), "torch_threads": torch.get_num_threads()}


def source_commit() -> str | None:
    """The git commit of this checkout of trojanprune (with "+dirty" when it has uncommitted
    changes), or None when it is not a git checkout (an installed wheel)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        # an installed copy inside someone else's repository is not that repository's commit
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", "__init__.py"],
                                 cwd=here, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        if tracked.returncode != 0 or head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               cwd=here, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def pruning_masks(model, pruned, example) -> dict[str, torch.Tensor]:
    """Per-group keep masks (1 = kept) for the saved record."""
    units = discover_units(model, example)
    keep = units.keep_mask(pruned)
    return {name: t.to(torch.uint8).contiguous() for name, t in units.split(keep).items()}


def save_repair(out: str | Path, source: ModelSource, result, record: dict, example,
                force: bool = False, extra_files: dict | None = None) -> Path:
    """A run directory (evaluable with ``trojanprune eval``) plus mask and repair record;
    ``extra_files`` (name -> content, as :func:`~trojanprune.runs.save_run` takes them) are
    written in the same atomic step, e.g. ``{"report.html": html}``."""
    run_record = {k: v for k, v in source.record.items()
                  if k not in ("format", "format_version", "versions")}
    run_record["model"] = source.spec.to_dict()
    run_record.setdefault("dataset", source.dataset)
    if source.attack is not None:
        run_record["attack"] = source.attack.config()
    run_record["metrics"] = record.get("after", {})
    run_record["repair"] = {k: v for k, v in record.items() if k != "details"}
    extra = {"repair.json": record,
             "mask.safetensors": pruning_masks(result.model, record["pruned"], example)}
    for name, image in getattr(result, "images", {}).items():
        extra[f"{name}.png"] = image
    extra.update(extra_files or {})
    # an adapted model's own weights, in the user's key layout (the record keeps the adapter)
    return save_run(out, source.spec.bare(result.model).cpu(), run_record, force=force,
                    extra_files=extra)


def _round(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


__all__ = ["choose_clean", "repair_and_measure", "save_repair", "log"]
