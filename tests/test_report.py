"""The HTML repair report: a real few-shot ShapPruning repair of the backdoor fixture, its
report's content (verdict, trigger images, per-channel scores, pruned table, ACC/ASR curve),
self-containment and escaping; ``trojanprune repair --report``; and, where Chromium is
installed, a real headless render of the page."""

from __future__ import annotations

import copy
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from trojanprune import data
from trojanprune.cli import app
from trojanprune.defenses.base import RepairResult
from trojanprune.errors import ConfigError, TrojanPruneError
from trojanprune.repair_run import repair_and_measure
from trojanprune.report import (curve_points, pruning_curve, ranked_pruned, render_report,
                                score_sets, write_report)
from trojanprune.runs import ModelSpec, save_run
from trojanprune.sources import ModelSource

REPO = Path(__file__).resolve().parents[1]
FAST = dict(reverse_steps=150, budget=0.03)
SPEC = ModelSpec(num_classes=10, in_channels=1, arch="vgg_small",
                 kwargs={"dataset": "mnist", "widths": [[16, 16], [32, 32], [64, 64]]})


def source_of(case) -> ModelSource:
    ds = {"name": "mnist", "image_shape": [1, 28, 28], "num_classes": 10, "image_size": None}
    return ModelSource(case.model, SPEC, ds, case.attack, {})


@pytest.fixture(scope="module")
def repaired(backdoor_case):
    few = data.clean_subset(backdoor_case.clean, per_class=1, seed=0)
    result, record = repair_and_measure(source_of(backdoor_case), "shappruning", clean=few,
                                        options=FAST, test=backdoor_case.test, progress=False)
    example = backdoor_case.test.images[:1].float() / 255
    curve = pruning_curve(backdoor_case.model, ranked_pruned(result), backdoor_case.test,
                          backdoor_case.attack, example, points=5)
    return SimpleNamespace(result=result, record=record, curve=curve)


def test_pruning_curve_matches_the_repair(backdoor_case, repaired):
    curve, record = repaired.curve, repaired.record
    n = record["pruned_count"]
    assert n >= 1 and [r["k"] for r in curve] == curve_points(n, 5)
    assert curve[0]["k"] == 0 and curve[-1]["k"] == n
    # the fixture's test set has 2,000 images: all of them are used, so the end points are
    # exactly the metrics before and after the repair (ShapPruning only prunes)
    assert curve[0]["images"] == len(backdoor_case.test) == 2000
    for key in ("acc", "asr", "ra"):
        assert curve[0][key] == pytest.approx(record["before"][key], abs=1e-3)
        assert curve[-1][key] == pytest.approx(record["after"][key], abs=1e-3)
    assert curve[-1]["asr"] < curve[0]["asr"] - 50


def test_ranking_follows_the_shapley_values(repaired):
    result = repaired.result
    sets = score_sets(result)
    assert [s.key for s in sets] == ["shapley.values"] and sets[0].prunes_high
    values = sets[0].values
    ranked = ranked_pruned(result)
    assert sorted(ranked) == sorted(result.pruned)
    scores = [values[g][c] for g, c in ranked]
    assert scores == sorted(scores, reverse=True)


def test_report_has_verdict_trigger_scores_table_curve_and_nothing_external(tmp_path, repaired):
    result, record, curve = repaired.result, repaired.record, repaired.curve
    path = write_report(tmp_path / "report.html", result, record, curve=curve)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "backdoor detected" in text and "target class" in text
    # trigger images inline, one per reversed-trigger picture
    for name in ("trigger_mask", "trigger_pattern", "trigger_stamp"):
        assert re.search(rf'alt="{name}" src="data:image/png;base64,[A-Za-z0-9+/=]{{40,}}"', text), name
    assert "Shapley value" in text and 'alt="pruning curve"' in text
    # per-layer pruned table: each layer with its count and channel indices
    per: dict[str, list[int]] = {}
    for g, c in result.pruned:
        per.setdefault(g, []).append(c)
    for g, chans in per.items():
        row = re.search(rf"<code>{re.escape(g)}</code></td><td class=\"num\">(\d+)</td>.*?"
                        rf"<span class=\"idx\">([\d, ]+)</span>", text)
        assert row and int(row.group(1)) == len(chans), g
        assert row.group(2) == ", ".join(map(str, sorted(chans)))
    # the curve's numbers and the before/after metrics are on the page
    for row in curve:
        assert f"{row['acc']:.2f} %" in text and f"{row['asr']:.2f} %" in text
    assert f"{record['der']:.2f} %" in text
    # self-contained: no scripts, no external src/href, no other files touched
    assert "<script" not in text
    assert not re.findall(r'(?:src|href)\s*=\s*"(?!data:)', text)
    # no URL anywhere (a bare "http" can occur by chance inside a base64 image; "://" cannot)
    assert not re.findall(r"(?i)https?://", text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_options_and_details_are_escaped(repaired):
    evil = '<script src="http://evil.example/x.js"></script><img src=x onerror=alert(1)>'
    result = copy.copy(repaired.result)
    result.options = {**result.options, "note": evil}
    result.details = {**result.details, "comment": evil}
    record = {**repaired.record, "options": result.options}
    text = render_report(result, record, title=evil)
    assert "<script" not in text and "<img src=x" not in text
    assert html.escape(evil, quote=True) in text
    assert not re.findall(r'(?:src|href)\s*=\s*"(?!data:)', text)


def test_report_without_trigger_or_measurements():
    """A non-detecting method on an unmeasured run: the page says what is missing."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 26 * 26, 10))
    result = RepairResult(model=model, method="anp", pruned=[("0", 2)], total_units=4,
                          details={"mask_values": {"0": [0.9, 0.8, 0.1, 0.95]}})
    record = {"method": "anp", "seed": 0, "before": {}, "after": {}, **result.to_dict()}
    text = render_report(result, record)
    assert "no verdict" in text and "Not computed" in text and "--no-eval" in text
    sets = score_sets(result)
    assert sets[0].label == "ANP mask value" and not sets[0].prunes_high
    assert "ANP mask value" in text
    # nothing pruned: a one-point curve is reported in words, not plotted
    record["details"] = {"reason": "no threshold <kept> accuracy"}
    text = render_report(RepairResult(model=model, method="anp", details=record["details"]),
                         record, curve=[{"k": 0, "acc": 91.5, "asr": 99.0, "ra": 1.0, "images": 50}])
    assert "Nothing was pruned, so there is no curve" in text and "91.50 %" in text
    assert 'alt="pruning curve"' not in text
    assert "no threshold &lt;kept&gt; accuracy" in text


def test_onp_suspects_are_named_when_no_single_target():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU())
    details = {"probe": {"probe": "suspects", "target": None,
                         "suspects": [{"space": "pixel", "class": 1}, {"space": "feature", "class": 0}]}}
    result = RepairResult(model=model, method="onp", pruned=[("0", 1)], details=details)
    text = render_report(result, {"method": "onp", **result.to_dict()})
    assert "suspects 1 (pixel), 0 (feature)" in text and "not identified" not in text
    result.images = {"reversed_trigger_mask_class1": torch.rand(1, 4, 4)}
    text = render_report(result, {"method": "onp", **result.to_dict()})
    assert "pixel-space reversed trigger for class 1: mask" in text


def test_clp_scores_and_generic_details():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU())
    details = {"u": 3, "groups": {"0": {"residual": False, "pruned": [1], "layers": {
        "0": {"bn": None, "threshold": 2.0, "uclc": [0.5, 4.0, 1.0], "flagged": [1]}}}},
        "extra": {"0": [1.0, 2.0, 3.0]}, "history": {"loss": [1.0, 0.5]}}
    result = RepairResult(model=model, method="clp", pruned=[("0", 1), ("0", 2)], details=details)
    sets = score_sets(result)
    assert [s.key for s in sets] == ["groups.*.layers.*.uclc", "extra"]  # not "history"
    assert sets[0].thresholds == {"0": 2.0}
    assert ranked_pruned(result) == [("0", 1), ("0", 2)]
    text = render_report(result, {"method": "clp", **result.to_dict()})
    assert "Lipschitz" in text and "clp details: extra" in text


def test_bad_inputs_fail_with_one_line(backdoor_case, tmp_path):
    with pytest.raises(ConfigError, match="true attack"):
        pruning_curve(backdoor_case.model, [], backdoor_case.test, None)
    with pytest.raises(ConfigError, match="unknown unit group"):
        pruning_curve(backdoor_case.model, [("nope", 0)], backdoor_case.test, backdoor_case.attack)
    with pytest.raises(ConfigError, match="at least 2 points"):
        curve_points(3, 1)
    with pytest.raises(TrojanPruneError, match="does not exist"):
        write_report(tmp_path / "missing" / "r.html", RepairResult(model=backdoor_case.model,
                                                                  method="ft"), {"method": "ft"})


@pytest.fixture(scope="module")
def run_dir(backdoor_case, tmp_path_factory):
    """The backdoor fixture saved as a run directory, as ``trojanprune attack`` would."""
    out = tmp_path_factory.mktemp("runs") / "mnist-badnets"
    ds = {"name": "mnist", "image_shape": [1, 28, 28], "num_classes": 10, "image_size": None}
    save_run(out, backdoor_case.model, {"model": SPEC.to_dict(), "dataset": ds,
                                        "attack": backdoor_case.attack.config(), "seed": 0})
    return out


def test_cli_repair_report(run_dir, shared_data_dir, tmp_path):
    out = tmp_path / "repaired"
    # u=1 (not the paper's 3) so that CLP surely prunes some channels and the curve has points
    result = CliRunner().invoke(app, ["repair", str(run_dir), "--method", "clp", "--data-free",
                                      "--set", "u=1", "--data-dir", str(shared_data_dir),
                                      "--out", str(out), "--report", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "Lipschitz" in text and 'alt="pruning curve"' in text
    assert record["pruned_count"] > 0 and f"{record['after']['asr']:.2f} %" in text
    assert not re.findall(r'(?:src|href)\s*=\s*"(?!data:)', text)
    # without --report there is no report, and nothing else changes
    plain = tmp_path / "plain"
    result = CliRunner().invoke(app, ["repair", str(run_dir), "--method", "clp", "--data-free",
                                      "--data-dir", str(shared_data_dir), "--out", str(plain),
                                      "--no-eval"])
    assert result.exit_code == 0, result.output
    assert not (plain / "report.html").exists() and (plain / "repair.json").is_file()


def test_cli_repair_says_the_verdict_and_the_methods_decision(run_dir, shared_data_dir, tmp_path):
    """Without --json a person reads the verdict, the target and why the method stopped: for
    a model whose trigger is unknown (no ASR to print) they are the result."""
    fast = ["--set", "reverse_steps=40", "--set", "permutations=10", "--set", "warmup=2",
            "--set", "budget=0.03"]
    result = CliRunner().invoke(app, ["repair", str(run_dir), "--method", "shappruning",
                                      "--per-class", "1", *fast, "--data-dir", str(shared_data_dir),
                                      "--out", str(tmp_path / "r"), "--no-eval"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r" / "repair.json").read_text())
    said = " ".join(result.output.split())  # the console wraps long lines
    assert f"verdict: {record['verdict']}" in said
    if record["target"] is not None:
        assert f"target class {record['target']}" in said
    assert f"shappruning: {record['details']['mitigation']['reason']}" in said


def _chromium() -> str | None:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on PATH (apt-get install chromium) "
                    "to render the report in a real browser")
def test_report_renders_in_headless_chromium(repaired, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from render_report import check_dom, render
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    page = write_report(tmp_path / "report.html", repaired.result, repaired.record,
                        curve=repaired.curve)
    try:
        dom = render(_chromium(), page, tmp_path / "shot.png", tmp_path / "dom.html", "1000,1600")
    except subprocess.CalledProcessError as exc:  # a browser that cannot start here
        pytest.skip(f"Chromium failed to start: {exc.stderr[-300:]!r}")
    assert check_dom(dom, expect_curve=True) == []
    # the browser parsed the page into the expected elements
    assert dom.count("<img") >= 5 and "backdoor detected" in dom
    png = (tmp_path / "shot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
