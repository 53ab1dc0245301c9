"""Render a real repair report in a headless browser: the HTML must parse and look right.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/render_report.py \
        --run benchmarks/zoo/cifar10-vgg_small-badnets --method shappruning --per-class 1 \
        --set reverse_steps=200 --out /tmp/report-check

Repairs the run (as ``trojanprune repair --report`` does: clean images from the training split,
ACC/ASR before and after on the test split, the ACC/ASR-vs-pruned-channels curve with the
run's true trigger), writes ``<out>/report.html``, then with Chromium (``chromium`` or
``chromium-headless-shell`` on PATH, or ``--browser``):

- ``--screenshot`` of the page at ``--window-size`` to ``<out>/report.png``;
- ``--dump-dom`` to ``<out>/report.dom.html``, checked for the parts a report must have (its
  headings, inline images, tables) and for anything loaded from outside the file.

Exits non-zero with one line saying what is wrong when a check fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from trojanprune import data
from trojanprune.cli import parse_settings
from trojanprune.repair_run import choose_clean, repair_and_measure
from trojanprune.report import pruning_curve, ranked_pruned, write_report
from trojanprune.sources import open_model

BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")


def find_browser(name: str | None = None) -> str | None:
    for candidate in ([name] if name else BROWSERS):
        path = shutil.which(candidate)
        if path:
            return path
    return None


def render(browser: str, html: Path, png: Path, dom: Path, size: str = "1200,3000") -> str:
    """Screenshot ``html`` to ``png`` and return (and save) its parsed DOM."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-extensions"]
    url = html.resolve().as_uri()
    subprocess.run([browser, *flags, f"--screenshot={png}", f"--window-size={size}", url],
                   check=True, capture_output=True, timeout=120)
    out = subprocess.run([browser, *flags, "--dump-dom", url], check=True, capture_output=True,
                         timeout=120, text=True).stdout
    dom.write_text(out, encoding="utf-8")
    return out


def check_dom(dom: str, expect_curve: bool) -> list[str]:
    """Problems found in a rendered report's DOM (empty when it is fine)."""
    problems = []
    for heading in ("Metrics before and after", "What was pruned, per layer", "Method options"):
        if heading not in dom:
            problems.append(f"heading {heading!r} missing")
    if expect_curve and "ACC / ASR against pruned channels" not in dom:
        problems.append("the pruning curve section is missing")
    if len(re.findall(r'src="data:image/png;base64,', dom)) < 1:
        problems.append("no inline PNG image")
    external = re.findall(r'(?:src|href)="(?!data:)[^"]*"', dom)
    if external:
        problems.append(f"external resources: {external[:3]}")
    if "<script" in dom:
        problems.append("a script element")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("benchmarks/zoo/cifar10-vgg_small-badnets"))
    ap.add_argument("--method", default="shappruning")
    ap.add_argument("--per-class", type=int, default=1)
    ap.add_argument("--set", dest="settings", action="append", default=["reverse_steps=200"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/trojanprune-report-check"))
    ap.add_argument("--browser", default=None)
    ap.add_argument("--window-size", default="1200,3000")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    browser = find_browser(args.browser)
    if browser is None:
        print(f"error: no Chromium found (tried {', '.join(BROWSERS)}); install it "
              "(Debian: apt-get install chromium) or pass --browser", file=sys.stderr)
        return 2
    src = open_model(args.run)
    if src.attack is None:
        print(f"error: {args.run} has no attack in its record; the curve needs the trigger",
              file=sys.stderr)
        return 2
    ds = src.dataset
    test = data.load_dataset(ds["name"], "test", image_size=ds.get("image_size"))
    clean = choose_clean(src, clean=None, per_class=args.per_class, data_free=False, seed=args.seed)
    start = time.perf_counter()
    result, record = repair_and_measure(src, args.method, clean=clean, seed=args.seed,
                                        options=parse_settings(args.settings), test=test,
                                        progress=False)
    example = test.images[:1].float() / 255
    curve = pruning_curve(src.model, ranked_pruned(result), test, src.attack, example,
                          seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    html = write_report(args.out / "report.html", result, record, curve=curve,
                        title=f"{args.method} repair of {args.run.name}")
    print(f"repaired and measured in {time.perf_counter() - start:.1f} s: pruned "
          f"{record['pruned_count']}, ASR {record['before']['asr']:.2f}% -> "
          f"{record['after']['asr']:.2f}%; wrote {html} ({html.stat().st_size / 1024:.0f} KiB)")
    dom = render(browser, html, args.out / "report.png", args.out / "report.dom.html",
                 args.window_size)
    problems = check_dom(dom, expect_curve=True)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"rendered with {browser}: {args.out / 'report.png'}; DOM "
          f"({len(dom) / 1024:.0f} KiB) in {args.out / 'report.dom.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
