"""Every defense, at its defaults, on backdoored models the defaults were never looked at on.

The defenses are meant for models trained elsewhere: other architectures, activations,
normalizations, input preprocessing and triggers. This script builds such models here (defined
below, not in the model registry), trains each with a backdoor on a training subset, and runs
every registered defense on it through the public ``trojanprune.repair`` with 500 clean
training images disjoint from the model's (ShapPruning one per class, CLP none), reporting ACC /
ASR before and after, time, and any failure with its message.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/unseen_models.py --out OUT.jsonl
    python benchmarks/unseen_models.py --cases gelu_resnet --defenses onp clp --out OUT.jsonl
    python benchmarks/unseen_models.py --clean --defenses shappruning --out OUT.jsonl  # no backdoor
    python benchmarks/unseen_models.py --table OUT.jsonl     # the markdown table of a results file
    python benchmarks/unseen_models.py --probe-scores OUT.jsonl  # ONP's probe score vs ASR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_model, save_model
from torch.nn import functional as F

import trojanprune as tp
from trojanprune import attacks, data, metrics
from trojanprune.attacks.base import Attack
from trojanprune.training import TrainConfig, train
from trojanprune.utils import derive_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from odd_models import ConvNeXtBlock  # noqa: E402  (the block benchmarks/odd_architectures.py runs too)


class Standardize(nn.Module):
    """Input preprocessing of a model trained elsewhere: (x - mean) / std with its own constants."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class GeluBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.gelu(self.n1(self.c1(x)))
        out = self.n2(self.c2(out))
        return F.gelu(out + (x if self.proj is None else self.proj(x)))


class GeluResNet(nn.Module):
    """Residual, GELU, projection shortcuts, functional flatten, no nn.ReLU anywhere."""

    def __init__(self, in_ch, classes):
        super().__init__()
        self.prep = Standardize([0.5] * in_ch, [0.25] * in_ch)
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.stages = nn.Sequential(GeluBlock(16, 16, 1), GeluBlock(16, 32, 2), GeluBlock(32, 48, 2))
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        x = F.gelu(self.stem(self.prep(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PlainNoBN(nn.Module):
    """No normalization layers at all; biased convs, max pooling, dropout, two linear layers;
    preprocessing x * 2 - 1 written inline."""

    def __init__(self, in_ch, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 24, 3, padding=1)
        self.conv2 = nn.Conv2d(24, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 48, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.hidden = nn.Linear(48 * 9, 64)
        self.out = nn.Linear(64, classes)

    def forward(self, x):
        x = x * 2 - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_max_pool2d(F.relu(self.conv3(x)), 3)
        return self.out(self.drop(F.relu(self.hidden(x.flatten(1)))))


class GroupNormSiLU(nn.Module):
    """GroupNorm instead of BatchNorm, SiLU activations."""

    def __init__(self, in_ch, classes):
        super().__init__()
        layers, cin = [], in_ch
        for cout, pool in ((16, False), (32, True), (32, False), (64, True)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(4, cout), nn.SiLU()]
            if pool:
                layers.append(nn.AvgPool2d(2))
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.body(x))


class InvertedResidual(nn.Module):
    def __init__(self, c, expand):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
                                       nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class MobileLike(nn.Module):
    """MobileNetV2-style: depthwise convolutions, inverted residuals, ReLU6, normalization from
    ImageNet constants as a buffer."""

    def __init__(self, in_ch, classes):
        super().__init__()
        mean, std = [0.485, 0.456, 0.406][:in_ch], [0.229, 0.224, 0.225][:in_ch]
        self.normalize = Standardize(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.block1 = InvertedResidual(24, 3)
        self.down = nn.Sequential(nn.Conv2d(24, 40, 3, 2, 1, bias=False), nn.BatchNorm2d(40), nn.ReLU6())
        self.block2 = InvertedResidual(40, 3)
        self.classifier = nn.Linear(40, classes)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(self.normalize(x)))))
        return self.classifier(x.mean((2, 3)))


class MLPNet(nn.Module):
    """Only linear layers: flatten, LayerNorm, GELU."""

    def __init__(self, in_ch, classes, size=28):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * size * size, 256), nn.LayerNorm(256),
                                 nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.net(x)


class DenseConcat(nn.Module):
    """DenseNet-style: each layer's output is concatenated to its input (pre-activation
    BatchNorm over the concatenation), a 1x1 transition with average pooling (stop 22)."""

    def __init__(self, in_ch, classes, growth=12):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 24, 3, padding=1, bias=False)
        self.norms, self.convs = nn.ModuleList(), nn.ModuleList()
        c = 24
        for i in range(4):
            if i == 2:
                self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 32, 1, bias=False),
                                                nn.AvgPool2d(2))
                c = 32
            self.norms.append(nn.BatchNorm2d(c))
            self.convs.append(nn.Conv2d(c, growth, 3, padding=1, bias=False))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for i, (norm, conv) in enumerate(zip(self.norms, self.convs)):
            if i == 2:
                x = self.transition(x)
            x = torch.cat([x, conv(F.relu(norm(x)))], 1)
        return self.fc(F.relu(self.norm(x)).mean((2, 3)))


class ConvNeXtMini(nn.Module):
    """ConvNeXt-style: patchify stem, depthwise 7x7, LayerNorm and linear layers on
    channels-last tensors, layer scale, GELU, no BatchNorm (stop 22)."""

    def __init__(self, in_ch, classes):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 32, 2, 2)
        self.norm0 = nn.GroupNorm(1, 32)
        self.blocks = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.down = nn.Conv2d(32, 64, 2, 2)
        self.blocks2 = nn.Sequential(ConvNeXtBlock(64))
        self.head_norm = nn.LayerNorm(64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(self.norm0(self.stem(x)))
        x = self.blocks2(self.down(x))
        return self.fc(self.head_norm(x.mean((2, 3))))


@dataclass
class LowFrequencyOptions:
    """eps: the trigger's largest pixel change; cutoff: the highest spatial frequency kept
    (cycles per image, in each direction)."""

    eps: float = 0.15
    cutoff: int = 3


class LowFrequency(Attack):
    """A smooth additive trigger, x' = clip(x + eps * p): p is random noise with every spatial
    frequency above ``cutoff`` removed, scaled to a largest value of 1.

    A stand-in for BackdoorBench's LF attack (Zeng et al., "Rethinking the Backdoor Attacks'
    Triggers: A Frequency Perspective", ICCV 2021), whose pattern is a low-passed *universal
    adversarial perturbation* of a clean model: this one has its place in frequency, a global,
    smooth, faint change with no patch to find, but not its adversarial direction.
    """

    name = "low-frequency"
    Options = LowFrequencyOptions

    def _build(self) -> None:
        c, h, w = self.image_shape
        noise = torch.randn(c, h, w, generator=torch.Generator().manual_seed(self.seed))
        spectrum = torch.fft.fft2(noise)
        fy, fx = torch.fft.fftfreq(h) * h, torch.fft.fftfreq(w) * w
        keep = (fy.abs().view(-1, 1) <= self.options.cutoff) & (fx.abs().view(1, -1) <= self.options.cutoff)
        smooth = torch.fft.ifft2(spectrum * keep).real
        self.pattern = smooth / smooth.abs().amax()

    def _apply(self, x):
        return (x + self.options.eps * self._on("pattern", x)).clamp(0, 1)


@dataclass
class SampleNoiseOptions:
    """eps: each pixel moves by +eps or -eps (then clipped to [0, 1])."""

    eps: float = 0.1


class SampleNoise(Attack):
    """A sample-specific trigger: every image gets its own +-eps noise, drawn from a hash of
    the image itself (so the trigger is a pure function of the image, as every attack here).

    A stand-in for the sample-specific triggers of SSBA (Li et al., ICCV 2021: an encoder's
    invisible per-image residual) and Input-aware (Nguyen & Tran, NeurIPS 2020: a generator's
    per-image pattern): no single mask and pattern triggers every image, which is what a
    Neural-Cleanse-style reverse searches for. Unlike theirs, the noise carries no learned
    structure; the model learns to detect the noise itself.
    """

    name = "sample-noise"
    Options = SampleNoiseOptions

    def _build(self) -> None:
        c, h, w = self.image_shape
        gen = torch.Generator().manual_seed(self.seed)
        self.hash_weights = torch.randint(1, 2 ** 20, (c * h * w,), generator=gen)

    def _apply(self, x):
        levels = (x.detach().cpu().flatten(1) * 255).round().long()
        seeds = (levels * self.hash_weights).sum(1) % (2 ** 31 - 1)
        signs = torch.stack([torch.randint(0, 2, x.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]).to(x) * 2 - 1
        return (x + self.options.eps * signs).clamp(0, 1)


#: trigger families defined here rather than in the attack registry (``CASES``' "attack" names
#: either)
LOCAL_ATTACKS = {"low-frequency": LowFrequency, "sample-noise": SampleNoise}


ARCHS = {"gelu_resnet": GeluResNet, "plain_nobn": PlainNoBN, "groupnorm_silu": GroupNormSiLU,
         "mobile_like": MobileLike, "mlp": MLPNet, "dense_concat": DenseConcat,
         "convnext_mini": ConvNeXtMini}

#: each case: a dataset, an architecture and a trigger the zoo never used
CASES = {
    "gelu_resnet": dict(dataset="mnist", arch="gelu_resnet", attack="badnets",
                        attack_options=dict(patch_size=4, position="top-left", colour="checkerboard"), target=3),
    "plain_nobn": dict(dataset="mnist", arch="plain_nobn", attack="blended",
                       attack_options=dict(alpha=0.15), target=7),
    "groupnorm_silu": dict(dataset="mnist", arch="groupnorm_silu", attack="badnets",
                           attack_options=dict(patch_size=3, position=(22, 4), colour="checkerboard"), target=5),
    "mobile_like": dict(dataset="mnist", arch="mobile_like", attack="wanet", attack_options={}, target=1),
    "mlp": dict(dataset="mnist", arch="mlp", attack="badnets",
                attack_options=dict(patch_size=4, position="bottom-left", colour="white"), target=9),
    # stop 22: concatenation, and LayerNorm on channels-last tensors
    "dense_concat": dict(dataset="mnist", arch="dense_concat", attack="blended",
                         attack_options=dict(alpha=0.2), target=2),
    "convnext_mini": dict(dataset="mnist", arch="convnext_mini", attack="badnets",
                          attack_options=dict(patch_size=3, position="top-right", colour="white"),
                          target=6),
    # stop 48: trigger families the defaults were never looked at on (defined above)
    "lowfreq_gelu": dict(dataset="mnist", arch="gelu_resnet", attack="low-frequency",
                         attack_options=dict(eps=0.15, cutoff=3), target=4),
    "sample_noise_mobile": dict(dataset="mnist", arch="mobile_like", attack="sample-noise",
                                attack_options=dict(eps=0.1), target=8),
}

DATA_FOR = {"shappruning": dict(per_class=1), "clp": None}


def build_case(name: str, data_dir, epochs: int, train_images: int, models_dir: Path | None = None,
               clean: bool = False):
    """The case's backdoored model (trained here, or loaded from ``models_dir`` when a previous
    run saved it), its attack, the defender's pool (training images the model never saw) and
    the test images. ``clean``: the same architecture trained on the same images unpoisoned (a
    defense should find no backdoor in it; the attack only measures how often its trigger
    sends images to the target naturally)."""
    spec = CASES[name]
    full = data.load_dataset(spec["dataset"], "train", data_dir=data_dir)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(derive_seed(0, name)))
    train_set = full.subset(order[:train_images])
    defender_pool = full.subset(order[train_images:train_images + 10000])
    test = data.load_dataset(spec["dataset"], "test", data_dir=data_dir)
    test = test.subset(range(0, len(test), max(1, len(test) // 2000)))
    make = LOCAL_ATTACKS.get(spec["attack"], lambda *a, **k: attacks.create(spec["attack"], *a, **k))
    attack = make(train_set.image_shape, train_set.num_classes, target=spec["target"], seed=0,
                  **spec["attack_options"])
    poisoned = train_set if clean else attack.poison(train_set, rate=0.1, seed=1)[0]
    torch.manual_seed(0)
    c = train_set.image_shape[0]
    model = ARCHS[spec["arch"]](c, train_set.num_classes)
    start = time.perf_counter()
    kind = "-clean" if clean else ""
    saved = None if models_dir is None else models_dir / f"{name}{kind}-{epochs}ep-{train_images}.safetensors"
    if saved is not None and saved.exists():
        load_model(model, saved)
    else:
        train(model, poisoned, TrainConfig(epochs=epochs, lr=0.05, seed=0), progress=False)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            save_model(model, saved)
    seconds = time.perf_counter() - start
    model.eval()
    return model, attack, defender_pool, test, seconds


def table(path: str) -> str:
    """A markdown table of a results file: one row per case, ACC / ASR after each defense (the
    last row recorded for a (case, defense) pair wins, so a rerun replaces an earlier one)."""
    rows: dict[tuple[str, str], dict] = {}
    cases: dict[str, dict] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        rows[(row["case"], row["defense"])] = row
        cases[row["case"]] = row
    methods = sorted({d for _, d in rows})
    out = ["| case | arch | attack (target) | before ACC / ASR | "
           + " | ".join(f"{m} ACC / ASR" for m in methods) + " |",
           "|---|---|---|---|" + "---|" * len(methods)]
    for case, any_row in cases.items():
        cells = []
        for m in methods:
            row = rows.get((case, m))
            if row is None:
                cells.append("")
            elif "error" in row:
                cells.append(f"error: {row['error'].split(':')[0]}")
            else:
                cells.append(f"{row['after']['acc']:.2f} / {row['after']['asr']:.2f}")
        b = any_row["before"]
        out.append(f"| {case} | {any_row['arch']} | {any_row['attack']} ({any_row['true_target']}) "
                   f"| {b['acc']:.2f} / {b['asr']:.2f} | " + " | ".join(cells) + " |")
    ders = []
    for m in methods:  # a failed repair leaves the model as it was: DER 50
        values = [rows[(c, m)].get("der", 50.0) for c in cases if (c, m) in rows]
        ders.append(f"{sum(values) / len(values):.2f}" if values else "")
    out.append("| mean DER (failed runs count 50) | | | | " + " | ".join(ders) + " |")
    return "\n".join(out)


def probe_scores(paths: list[str]) -> str:
    """A markdown table: each ONP row with details of the results files, its ASR before and
    after, and its probe's backdoor score on the clean images before and after the pruning."""
    out = ["| file | case | ASR before | ASR after | probe score before -> after |", "|---|---|---|---|---|"]
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            estimate = (row.get("details") or {}).get("choice", {}).get("clean_estimate", {})
            score = estimate.get("backdoor_score")
            if row.get("defense") != "onp" or not score:
                continue
            out.append(f"| {Path(path).name} | {row['case']} | {row['before']['asr']:.2f} | "
                       f"{row['after']['asr']:.2f} | {score[0]:.2f} -> {score[1]:.2f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", metavar="RESULTS_JSONL",
                        help="print the markdown table of a results file and exit")
    parser.add_argument("--probe-scores", nargs="+", metavar="RESULTS_JSONL",
                        help="print ONP's probe backdoor score before and after each recorded "
                             "repair (runs made with --details) and exit")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--defenses", nargs="+", default=None, help="default: every registered one")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="DEFENSE.KEY=VALUE",
                        help="override a defense option, e.g. onp.episodes=64")
    parser.add_argument("--models-dir", default=None,
                        help="save each trained model here, and reuse it on the next run")
    parser.add_argument("--clean", action="store_true",
                        help="train each architecture WITHOUT a backdoor: how often a defense "
                             "reports one where there is none")
    parser.add_argument("--details", action="store_true",
                        help="also record each repair's details (probe, choice, scores)")
    parser.add_argument("--out", help="JSONL file, appended to")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.probe_scores:
        print(probe_scores(args.probe_scores))
        return
    if not args.out:
        parser.error("--out is required to run cases")
    torch.set_num_threads(args.threads)
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        method, option = key.split(".", 1)
        overrides.setdefault(method, {})[option] = value
    methods = args.defenses or tp.defenses.available()
    out = Path(args.out)
    for name in args.cases:
        model, attack, pool, test, train_seconds = build_case(
            name, args.data_dir, args.epochs, args.train_images,
            Path(args.models_dir) if args.models_dir else None, clean=args.clean)
        before = metrics.evaluate(model, test, attack)
        print(f"[{name}] trained in {train_seconds:.0f}s: {before}", flush=True)
        for method in methods:
            setting = DATA_FOR.get(method, dict(n=500))
            clean = None if setting is None else data.clean_subset(pool, seed=0, **setting)
            row = dict(case=name, **{("true_target" if k == "target" else k): v
                                   for k, v in CASES[name].items()}, defense=method,
                       before=before, clean=setting)
            if args.clean:  # no backdoor: no true target
                row.update(clean_model=True, true_target=None)
            options = dict(overrides.get(method, {}))
            if method == "clp":  # data-free: the input shape the user knows of their model
                options.setdefault("input_shape", ",".join(map(str, test.image_shape)))
            start = time.perf_counter()
            try:
                result = tp.repair(model, clean, method=method, seed=0, **options)
                row.update(after=metrics.evaluate(result.model, test, attack),
                           pruned=len(result.pruned), verdict=result.verdict, target=result.target,
                           evaluations=result.evaluations, seconds=round(result.seconds, 1))
                if args.details:
                    row["details"] = result.to_dict()["details"]
                row["der"] = round(100 * metrics.defense_effectiveness_rating(
                    before["acc"] / 100, row["after"]["acc"] / 100,
                    before["asr"] / 100, row["after"]["asr"] / 100), 2)
            except Exception as exc:  # noqa: BLE001 - a failure is a result here
                row.update(error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc(limit=6),
                           seconds=round(time.perf_counter() - start, 1))
            print(json.dumps({k: row.get(k) for k in ("case", "defense", "after", "der", "pruned",
                                                      "target", "seconds", "error")}), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
