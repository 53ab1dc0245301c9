"""Every unit group that discovery finds on many models, to compare two versions of the engine.

A change to unit discovery (``trojanprune.engine.units``) changes what every defense prunes.
This script records, for each model, every group's ``repr`` (name, size, mask and hook points
with their channels, members, consumers). Run it on two versions of the code, then
``--compare``: it names the models whose groups differ. The models: the four zoo
architectures, ``tests/odd_models.py``, ``benchmarks/unseen_models.py`` and, where torchvision
is installed, ten or more torchvision definitions (randomly initialized; discovery reads only
the graph and the shapes).

    PYTHONPATH=OLD/src python benchmarks/unit_discovery_snapshot.py --out before.json
    PYTHONPATH=NEW/src python benchmarks/unit_discovery_snapshot.py --out after.json
    python benchmarks/unit_discovery_snapshot.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
               "regnet_x_400mf", "squeezenet1_0", "mnasnet0_5", "densenet121", "vgg11_bn", "convnext_tiny"]


def cases() -> dict:
    """name -> (make model, input channels, input side)."""
    import odd_models
    import unseen_models
    from trojanprune import models

    out = {}
    for name in ["vgg_small", "resnet20", "preact_resnet18", "lenet5"]:
        channels, side = (1, 28) if name == "lenet5" else (3, 32)
        out[name] = (lambda name=name, channels=channels: models.create(name, 10, in_channels=channels),
                     channels, side)
    for name, (cls, side) in odd_models.ARCHS.items():
        out[f"odd-{name}"] = (cls, 3, side)
    for name, cls in unseen_models.ARCHS.items():
        out[f"unseen-{name}"] = (lambda cls=cls: cls(1, 10), 1, 28)
    try:
        from odd_architectures import import_torchvision, torchvision_arch

        torchvision = import_torchvision()
    except ImportError:
        print("torchvision is not installed: its models are left out", file=sys.stderr)
        return out
    for name in TORCHVISION:
        make, side = torchvision_arch(torchvision, name)
        out[f"tv-{name}"] = (make, 3, side)
    return out


def snapshot() -> dict[str, list[str] | str]:
    from trojanprune.engine import discover_units

    torch.manual_seed(0)
    out: dict[str, list[str] | str] = {}
    for name, (make, channels, side) in cases().items():
        model = make().eval()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                units = discover_units(model, torch.rand(1, channels, side, side))
            out[name] = [repr(group) for group in units.groups]
            print(f"{name}: {units.total} units in {len(out[name])} groups", flush=True)
        except Exception as exc:  # the point: record it and go on
            out[name] = f"error: {type(exc).__name__}: {exc}"
            print(f"{name}: {out[name][:200]}", flush=True)
    return out


def compare(before: dict, after: dict) -> list[str]:
    lines = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a == b:
            lines.append(f"{name}: same")
        elif isinstance(a, str) or isinstance(b, str) or a is None or b is None:
            describe = lambda v: "absent" if v is None else (v[:120] if isinstance(v, str) else f"{len(v)} groups")  # noqa: E731
            lines.append(f"{name}: DIFFERENT ({describe(a)} -> {describe(b)})")
        else:
            gone = [g.split(",")[0] for g in a if g not in b]
            new = [g.split(",")[0] for g in b if g not in a]
            lines.append(f"{name}: DIFFERENT ({len(a)} -> {len(b)} groups; changed or gone: {gone}; "
                         f"changed or new: {new})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the snapshot (JSON) here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        print("\n".join(compare(*(json.loads(Path(p).read_text()) for p in args.compare))))
        return
    if not args.out:
        parser.error("give --out (to record) or --compare BEFORE AFTER")
    torch.set_num_threads(1)
    Path(args.out).write_text(json.dumps(snapshot(), indent=0) + "\n")


if __name__ == "__main__":
    main()
