"""Replay the detection on every stored trigger reverse: Neural Cleanse's MAD test alone, and with
the small-mask ratio rule (``trojanprune.reverse.detect.SMALL_MASK_RATIO``).

Every results file under ``benchmarks/results`` (JSON, JSON lines, HTML reports) holds the
summaries of the reverses its repairs ran (mask norms, attack success, the flags). This script
finds each one, drops repeats (the same norms stored twice), and runs
:func:`trojanprune.reverse.detect_outlier` (pixel space) or ``detect_working`` (feature space) on
the stored norms with the ratio rule off and on. The backdoor target is known for the zoo models
(every CIFAR-10 / GTSRB zoo model, its seeds included, has target 0) and for the unseen models
(their records carry ``true_target``); the unseen architectures trained without a backdoor
(``unseen_models.py --clean``) and the PreAct-ResNet18 that learned none count as "no
backdoor". Only the norms are replayed: what a repair does with a changed flag is measured by
running it (BENCHMARKS.md, "Stop 43").

    python benchmarks/replay_small_mask_rule.py                 # summary and every changed flag
    python benchmarks/replay_small_mask_rule.py --ratio 2.5 --all
"""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import torch

from trojanprune.reverse.detect import SMALL_MASK_RATIO, detect_outlier
from trojanprune.reverse.feature import detect_working

RESULTS = Path(__file__).resolve().parent / "results"
ZOO_WORDS = ("cifar10", "gtsrb", "vgg_small", "resnet20")


def summaries(obj, found: list, context: dict) -> None:
    """Collect every dict that looks like a reverse's summary, with the record's true target."""
    if isinstance(obj, dict):
        if "true_target" in obj:
            context = {**context, "true_target": obj["true_target"], "case": obj.get("case"),
                       "clean_model": bool(obj.get("clean_model"))}
        if "mask_norms" in obj and "anomaly_index" in obj and "flagged" in obj:
            found.append((obj, context))
        for value in obj.values():
            summaries(value, found, context)
    elif isinstance(obj, list):
        for value in obj:
            summaries(value, found, context)


def load(path: Path) -> list:
    text = path.read_text(errors="replace")
    if path.suffix == ".html":
        # the reports embed the repair's details as escaped JSON; take each reverse summary
        text = html.unescape(text)
        out, decoder = [], json.JSONDecoder()
        for m in re.finditer(r'\{\s*"verdict":', text):
            try:
                out.append(decoder.raw_decode(text, m.start())[0])
            except json.JSONDecodeError:
                pass
        return out
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [json.loads(text)]


def records():
    seen = set()
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix not in (".json", ".jsonl", ".html"):
            continue
        try:
            objects = load(path)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        for obj in objects:
            found: list = []
            summaries(obj, found, {})
            for summary, context in found:
                norms = summary["mask_norms"]
                if len(norms) < 3:
                    continue  # a recheck's few re-reversed masks, not one per class
                key = tuple(round(float(v), 2) for v in norms)
                if key in seen:
                    continue
                seen.add(key)
                rel = str(path.relative_to(RESULTS))
                if context.get("clean_model"):
                    target, family = None, "no backdoor"
                elif "true_target" in context:
                    target, family = context["true_target"], f"unseen:{context.get('case')}"
                elif any(w in rel for w in ZOO_WORDS):
                    target, family = 0, "zoo"
                else:
                    target, family = None, "no backdoor"
                space = "feature" if "layer" in summary else "pixel"
                yield rel, family, target, space, summary


def detect(summary: dict, space: str, ratio):
    norms = torch.tensor(summary["mask_norms"], dtype=torch.float64)
    threshold = float(summary.get("threshold", 2.0))
    if space == "feature":
        return detect_working(norms, torch.tensor(summary["attack_success"]), threshold, ratio).flagged
    return detect_outlier(norms, threshold, ratio).flagged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=SMALL_MASK_RATIO)
    parser.add_argument("--all", action="store_true", help="list every reverse, not only the changed ones")
    args = parser.parse_args()
    rows = list(records())
    tally: dict = {}
    print(f"| record | family | space | target | flags, MAD alone | flags, with 1/{args.ratio:g} rule |")
    print("|---|---|---|---|---|---|")
    for rel, family, target, space, summary in rows:
        plain = detect(summary, space, None)
        ruled = detect(summary, space, args.ratio)
        median = float(torch.tensor(summary["mask_norms"]).median())  # the detection's median
        t = tally.setdefault((family.split(":")[0], space), {
            "reverses": 0, "changed": 0, "targets": 0, "target MAD": 0, "target rule": 0,
            "others": 0, "other MAD": 0, "other rule": 0, "largest other": 0.0, "smallest flagged target": None})
        t["reverses"] += 1
        t["changed"] += int(plain != ruled)
        for k, v in enumerate(summary["mask_norms"]):
            ratio = median / max(float(v), 1e-12)
            kind = "target" if k == target else "other"
            t["targets" if kind == "target" else "others"] += 1
            t[f"{kind} MAD"] += int(k in plain)
            t[f"{kind} rule"] += int(k in ruled)
            if kind == "other":
                t["largest other"] = max(t["largest other"], ratio)
            elif k in ruled:
                low = t["smallest flagged target"]
                t["smallest flagged target"] = ratio if low is None else min(low, ratio)
        if plain != ruled or args.all:
            print(f"| {rel} | {family} | {space} | {target} | {plain} | {ruled} |")
    print()
    print("| family | space | reverses | flags changed | targets flagged: MAD alone / with the rule / all "
          "| other classes flagged: MAD alone / with the rule / all | median/norm: smallest of a flagged "
          "target, largest of another class |")
    print("|---|---|---:|---:|---|---|---|")
    for (fam, space), t in sorted(tally.items()):
        low = t["smallest flagged target"]
        print(f"| {fam} | {space} | {t['reverses']} | {t['changed']} | {t['target MAD']} / {t['target rule']} / "
              f"{t['targets']} | {t['other MAD']} / {t['other rule']} / {t['others']} | "
              f"{'-' if low is None else f'{low:.2f}'}, {t['largest other']:.2f} |")


if __name__ == "__main__":
    main()
