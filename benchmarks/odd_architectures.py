"""Does every defense run end to end on architectures our zoo lacks? A crash check, not a
quality measure: the models (``tests/odd_models.py``: DenseNet concatenation, SE gates, channel
shuffle, ConvNeXt, a ViT, Inception branches, a BatchNorm1d head on 64x64 inputs, a block
applied twice) are fitted for a few steps to a synthetic rule on random images, so they carry
no backdoor, and each defense
runs with short settings (fewer steps and episodes than its defaults) through the public
``trojanprune.repair``. Per model it also checks that the batched masked evaluation, the hooked
model and the repaired (zeroed) copy compute the same logits under a random pruning.

    python benchmarks/odd_architectures.py [--archs densenet vit] [--defenses onp shappruning]

``--torchvision NAME ...`` runs torchvision's own definitions instead (randomly initialized,
10 classes, 32x32 inputs; 64x64 where a model needs them), fitted the same way; torchvision is
not a dependency of the toolkit: ``pip install torchvision`` at the version that matches your
torch (0.28.0 for torch 2.13):

    python benchmarks/odd_architectures.py --torchvision resnet18 shufflenet_v2_x0_5 --defenses onp

``--set DEFENSE.KEY=VALUE`` changes one of the short settings (e.g. ShapPruning's players on a
large model: ``--set shappruning.layers=last:2``).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

import trojanprune as tp
from trojanprune.engine import discover_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from odd_models import ARCHS, logit_gaps  # noqa: E402

#: short settings: enough to exercise every stage of each defense
QUICK = {
    "onp": dict(episodes=32, reverse_steps=20, feature_steps=20),
    "shappruning": dict(reverse_steps=20, feature_steps=20, permutations=10, synth_steps=20),
    "anp": dict(iterations=20),
    "rnp": dict(unlearn_epochs=2, recover_epochs=2),
    "clp": {},
    "fp": dict(finetune_epochs=1),
    "ft": dict(epochs=1),
}


#: torchvision models whose stems need more than 32x32 pixels
TORCHVISION_SIDE = {"squeezenet1_0": 64, "squeezenet1_1": 64, "googlenet": 64, "inception_v3": 299}
#: and those that return auxiliary outputs in train mode unless told not to, or whose
#: positional embedding is sized for 224x224 unless told the image size
TORCHVISION_KWARGS = {"googlenet": dict(aux_logits=False, init_weights=True),
                      "inception_v3": dict(aux_logits=False, init_weights=True),
                      "vit_b_16": dict(image_size=32)}


def import_torchvision():
    """torchvision, also where its compiled ops cannot load.

    The torchvision wheel on PyPI is built for CUDA torch; beside the CPU torch wheel its
    compiled ops do not load, and its import stops at registering their fake kernels
    ("operator torchvision::nms does not exist"). The model definitions need none of those
    ops, so the import is tried again without that registration.
    """
    import torch.library

    try:
        import torchvision
        return torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    try:
        import torchvision
    finally:
        torch.library.register_fake = register_fake
    return torchvision


def torchvision_arch(torchvision, name: str):
    """(model factory, input side) of torchvision's ``name``: 10 classes, random weights."""
    return (lambda: torchvision.models.get_model(name, num_classes=10, **TORCHVISION_KWARGS.get(name, {})),
            TORCHVISION_SIDE.get(name, 32))


def add_torchvision(names: list[str]) -> None:
    """Put torchvision's ``names`` into ARCHS (as "tv-NAME")."""
    torchvision = import_torchvision()
    for name in names:
        ARCHS[f"tv-{name}"] = torchvision_arch(torchvision, name)


def fitted(name: str):
    """The model, fitted for 30 Adam steps to 'class = the brightest of ten row bands of the
    red channel' on 100 random images, and those images."""
    cls, side = ARCHS[name]
    torch.manual_seed(0)
    model = cls()
    x = torch.rand(100, 3, side, side)
    y = x[:, 0, :10, :].mean(1).argmax(1) % 10
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y, side


def engine_gap(model, x) -> tuple[float, float]:
    """Largest |logit| gap: batched evaluator vs hooked model, hooked vs zeroed copy."""
    total = discover_units(model, x[:1]).total
    masks = (torch.rand(3, total, generator=torch.Generator().manual_seed(0)) > 0.2).float()
    gaps = logit_gaps(model, x[:16], masks)
    return gaps["evaluator_vs_hooked"], gaps["hooked_vs_zeroed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=None, choices=list(ARCHS),
                        help="default: every model of tests/odd_models.py (none with --torchvision)")
    parser.add_argument("--torchvision", nargs="+", default=[], metavar="NAME",
                        help="torchvision model names (torchvision.models.get_model)")
    parser.add_argument("--defenses", nargs="+", default=list(QUICK), choices=list(QUICK))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="DEFENSE.KEY=VALUE",
                        help="override a short setting, e.g. shappruning.layers=last:2")
    args = parser.parse_args()
    for item in args.set:
        key, _, value = item.partition("=")
        method, _, option = key.partition(".")
        if method not in QUICK or not option or not value:
            parser.error(f"--set wants DEFENSE.KEY=VALUE with DEFENSE one of {list(QUICK)}, got {item!r}")
        QUICK[method][option] = value
    if args.archs is None:
        args.archs = [] if args.torchvision else list(ARCHS)
    if args.torchvision:
        add_torchvision(args.torchvision)
        args.archs += [f"tv-{name}" for name in args.torchvision]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    failures = 0
    for name in args.archs:
        try:
            model, x, y, side = fitted(name)
            gap_eval, gap_zero = engine_gap(model, x)
        except Exception as exc:  # a model the engine cannot map: every defense would fail alike
            failures += 1
            print(f"{name}: FAIL  {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        print(f"{name}: evaluator vs hooked {gap_eval:.1e}, hooked vs zeroed copy {gap_zero:.1e}", flush=True)
        for method in args.defenses:
            modes = (["30 images", "data-free"] if method == "shappruning" else
                     ["data-free"] if method == "clp" else ["100 images"])
            for mode in modes:
                options = dict(QUICK[method])
                clean = {"100 images": (x, y), "30 images": (x[:30], y[:30])}.get(mode)
                if clean is None:
                    options["input_shape"] = f"3,{side},{side}"
                start = time.perf_counter()
                try:
                    result = tp.repair(model, clean, method=method, **options)
                    print(f"  ok    {method:12s} {mode:10s} pruned {len(result.pruned):3d} "
                          f"{time.perf_counter() - start:6.1f} s", flush=True)
                except Exception as exc:  # the point of the script: report, go on
                    failures += 1
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    print(f"  FAIL  {method:12s} {mode:10s} {type(exc).__name__}: {str(exc)[:200]} "
                          f"({Path(where.filename).name}:{where.lineno})", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
