"""The benchmark grid: config validation, the resumable results file, tables, and a small grid
end to end on Ray with 2 workers (embedded digits, LeNet-5, one backdoor, cheap defenses)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from trojanprune.bench import parse_config, run_bench
from trojanprune.bench.config import load_config
from trojanprune.bench.results import (RESULTS_FILE, RESULTS_FORMAT, ResultsFile,
                                       read_results)
from trojanprune.bench.tables import csv_table, markdown_table
from trojanprune.errors import ConfigError, DataError, TrojanPruneError

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny", "datasets": ["digits"], "archs": ["lenet5"], "attacks": ["badnets"],
    "defenses": ["clp", "ft", "fp"], "seeds": [0],
    "train": {"epochs": 20, "lr": 0.05, "batch_size": 64},
    "clean": {"images": 200},
    "defense_options": {"ft": {"epochs": 2}, "fp": {"finetune_epochs": 2}},
}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance with 2 workers for the module (starting Ray takes seconds)."""
    pytest.importorskip("ray")
    import ray

    from trojanprune.bench.ray_runner import init_ray

    started = init_ray(2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_grid(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    start = time.perf_counter()
    summary = run_bench(parse_config(TINY), out, workers=2)
    return out, summary, time.perf_counter() - start


def lines(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / RESULTS_FILE).read_text().splitlines()]


def test_grid_end_to_end_on_ray(tiny_grid):
    out, summary, seconds = tiny_grid
    assert summary["cells"] == 3 and summary["ran"] == 3 and summary["failed"] == 0
    head, *cells = lines(out)
    assert head["format"] == RESULTS_FORMAT and head["format_version"] == 1
    assert sorted(c["defense"] for c in cells) == ["clp", "fp", "ft"]
    for c in cells:
        assert c["status"] == "ok", c.get("error")
        assert c["asr_before"] > 80 and c["acc_before"] > 80  # the backdoor is real
        for key in ("acc_after", "asr_after", "ra_after", "ra_before"):
            assert 0 <= c[key] <= 100
        assert 0 <= c["der"] <= 100
        assert c["seconds"] > 0 and c["peak_rss_mib"] > 10 and c["evaluations"] >= 0
        assert set(c["versions"]) == {"trojanprune", "torch", "python"}
        assert c["cpu"] and c["cpu_capability"]  # another CPU may sum in another order
        assert c["pruned_count"] >= 0 and c["test_images"] > 0
    by = {c["defense"]: c for c in cells}
    assert by["clp"]["clean"] == "none (data-free)" and by["clp"]["clean_images"] == 0
    assert by["ft"]["clean_images"] == 200 and by["ft"]["clean"] == "200 from train"
    # one backdoored model, trained once, shared by all three cells
    assert [p.name for p in (out / "models").iterdir()] == ["digits-lenet5-badnets-seed0"]
    assert len({c["acc_before"] for c in cells}) == 1
    for name in ("results.md", "results.csv", "asr_vs_acc.png", "der_per_attack.png",
                 "time_per_defense.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| badnets |" in (out / "results.md").read_text()


def test_resume_recomputes_nothing_finished(tiny_grid, tmp_path):
    src, _, _ = tiny_grid
    out = tmp_path / "out"
    shutil.copytree(src, out)
    head, *cells = (out / RESULTS_FILE).read_text().splitlines(keepends=True)
    kept = [c for c in cells if json.loads(c)["defense"] != "ft"]
    # the ft cell was never recorded, and a crash tore the line being written
    (out / RESULTS_FILE).write_text(head + "".join(kept) + '{"dataset": "digits", "ar')
    model_json = out / "models" / "digits-lenet5-badnets-seed0" / "run.json"
    model_mtime = model_json.stat().st_mtime_ns
    summary = run_bench(parse_config(TINY), out, workers=2, tables=False, plots=False)
    assert summary["ran"] == 1 and summary["skipped"] == 2
    text = (out / RESULTS_FILE).read_text()
    assert text.endswith("\n") and '"ar\n' not in text and '"ar{' not in text
    after = text.splitlines(keepends=True)
    assert after[:1 + len(kept)] == [head] + kept  # finished cells untouched
    assert [json.loads(l)["defense"] for l in after[1 + len(kept):]] == ["ft"]
    assert model_json.stat().st_mtime_ns == model_mtime  # the model was reused, not retrained
    # everything finished: a further run computes nothing
    assert run_bench(parse_config(TINY), out, workers=2, tables=False, plots=False)["ran"] == 0


def test_only_runs_part_of_the_grid_and_the_rest_later(tiny_grid, tmp_path):
    src, _, _ = tiny_grid
    out = tmp_path / "out"
    shutil.copytree(src, out)
    head, *cells = (out / RESULTS_FILE).read_text().splitlines(keepends=True)
    (out / RESULTS_FILE).write_text(head + "".join(c for c in cells if json.loads(c)["defense"] == "fp"))
    summary = run_bench(parse_config(TINY), out, workers=2, only={"defense": ["ft"]}, plots=False)
    assert summary["ran"] == 1 and summary["skipped"] == 0
    assert sorted(c["defense"] for c in lines(out)[1:]) == ["fp", "ft"]  # clp left for later
    # the tables cover every finished cell of the grid, not just the selected ones
    table = (out / "results.md").read_text()
    assert "| fp | 1 |" in table and "| ft | 1 |" in table and "| clp | 1 |" not in table
    summary = run_bench(parse_config(TINY), out, workers=2, tables=False, plots=False)
    assert summary["ran"] == 1 and summary["skipped"] == 2  # now clp
    with pytest.raises(ConfigError, match="nope not in this grid's defenses \\(clp, ft, fp\\)"):
        run_bench(parse_config(TINY), tmp_path / "o2", only={"defense": ["nope"]})
    with pytest.raises(ConfigError, match="unknown key .*valid: dataset, arch"):
        run_bench(parse_config(TINY), tmp_path / "o2", only={"model": ["x"]})
    assert not (tmp_path / "o2").exists()  # refused before anything was written


def test_failing_cell_is_recorded_and_the_grid_goes_on(tiny_grid, tmp_path):
    src, _, _ = tiny_grid
    config = dict(TINY, defenses=["clp", "ft"], models_dir=str(src / "models"),
                  model_pattern="{dataset}-{arch}-{attack}-seed{seed}",
                  # valid at load time, impossible at run time: digits has ~140 images a class
                  clean_for={"ft": {"per_class": 100000}})
    out = tmp_path / "out"
    summary = run_bench(parse_config(config), out, workers=2)
    assert summary["ran"] == 2 and summary["failed"] == 1
    by = {c["defense"]: c for c in lines(out)[1:]}
    assert by["ft"]["status"] == "failed" and "per_class=100000" in by["ft"]["error"]
    assert "\n" not in by["ft"]["error"]
    assert by["clp"]["status"] == "ok"
    assert not (out / "models").exists()  # the model came from models_dir
    assert "failed" in (out / "results.md").read_text()
    # a resume does not retry the failure unless asked
    assert run_bench(parse_config(config), out, workers=2, tables=False, plots=False)["ran"] == 0


RECORDS = [
    {"dataset": "cifar10", "arch": "vgg_small", "attack": "badnets", "defense": "clp", "seed": 0,
     "status": "ok", "acc_before": 80.0, "asr_before": 90.0, "acc_after": 78.0,
     "asr_after": 10.0, "der": 89.0, "seconds": 2.0, "evaluations": 0, "peak_rss_mib": 500.0},
    {"dataset": "cifar10", "arch": "vgg_small", "attack": "badnets", "defense": "clp", "seed": 1,
     "status": "ok", "acc_before": 82.0, "asr_before": 94.0, "acc_after": 80.0,
     "asr_after": 20.0, "der": 86.0, "seconds": 4.0, "evaluations": 0, "peak_rss_mib": 520.0},
    {"dataset": "cifar10", "arch": "vgg_small", "attack": "badnets", "defense": "anp", "seed": 0,
     "status": "ok", "acc_before": 80.0, "asr_before": 90.0, "acc_after": 75.5,
     "asr_after": 5.25, "der": 90.125, "seconds": 30.0, "evaluations": 2000,
     "peak_rss_mib": 700.0},
    {"dataset": "cifar10", "arch": "vgg_small", "attack": "badnets", "defense": "anp", "seed": 1,
     "status": "failed", "error": "MemoryError: out of memory"},
    {"dataset": "cifar10", "arch": "vgg_small", "attack": "blended", "defense": "clp", "seed": 0,
     "status": "failed", "error": "RuntimeError: boom"},
    {"dataset": "cifar10", "arch": "vgg_small", "attack": "blended", "defense": "anp", "seed": 0,
     "status": "ok", "acc_before": 81.0, "asr_before": 99.0, "acc_after": 80.0,
     "asr_after": 1.0, "der": 98.5, "seconds": 10.0, "evaluations": 1000,
     "peak_rss_mib": 650.0},
]

EXPECTED_MD = """\
### cifar10 / vgg_small

ACC, ASR and DER in %, mean over seed(s) 0, 1 of the cells that finished.

| attack | No defense ACC | No defense ASR | clp ACC | clp ASR | clp DER | anp ACC | anp ASR | anp DER |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| badnets | 81.00 | 92.00 | 79.00 | 15.00 | 87.50 | 75.50 | 5.25 | 90.12 |
| blended | 81.00 | 99.00 | failed | failed | failed | 80.00 | 1.00 | 98.50 |

### cost per defense

| defense | cells ok | cells failed | mean seconds | mean evaluations | max peak RSS MiB |
|---|---:|---:|---:|---:|---:|
| clp | 2 | 1 | 3.00 | 0.00 | 520 |
| anp | 2 | 1 | 20.00 | 1500.00 | 700 |

### every cell

| dataset | arch | attack | defense | seed | ACC before | ASR before | RA before | ACC | ASR | RA | DER | pruned | seconds | evaluations | peak RSS MiB |
|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| cifar10 | vgg_small | badnets | clp | 0 | 80.00 | 90.00 | - | 78.00 | 10.00 | - | 89.00 | - | 2.00 | 0 | 500 |
| cifar10 | vgg_small | badnets | clp | 1 | 82.00 | 94.00 | - | 80.00 | 20.00 | - | 86.00 | - | 4.00 | 0 | 520 |
| cifar10 | vgg_small | badnets | anp | 0 | 80.00 | 90.00 | - | 75.50 | 5.25 | - | 90.12 | - | 30.00 | 2000 | 700 |
| cifar10 | vgg_small | badnets | anp | 1 | failed: MemoryError: out of memory | | | | | | | | | | |
| cifar10 | vgg_small | blended | clp | 0 | failed: RuntimeError: boom | | | | | | | | | | |
| cifar10 | vgg_small | blended | anp | 0 | 81.00 | 99.00 | - | 80.00 | 1.00 | - | 98.50 | - | 10.00 | 1000 | 650 |
"""

EXPECTED_CSV = """\
dataset,arch,attack,seeds,none_acc,none_asr,clp_acc,clp_asr,clp_der,anp_acc,anp_asr,anp_der
cifar10,vgg_small,badnets,2,81.00,92.00,79.00,15.00,87.50,75.50,5.25,90.12
cifar10,vgg_small,blended,1,81.00,99.00,,,,80.00,1.00,98.50
"""


def test_tables_from_a_fixed_results_file(tmp_path):
    path = tmp_path / RESULTS_FILE
    path.write_text(json.dumps({"format": RESULTS_FORMAT, "format_version": 1}) + "\n"
                    + "".join(json.dumps(r) + "\n" for r in RECORDS))
    _, records = read_results(path)
    assert markdown_table(records, ["clp", "anp"], ["badnets", "blended"]) == EXPECTED_MD
    assert csv_table(records, ["clp", "anp"]) == EXPECTED_CSV


def test_config_errors_are_all_reported_at_load_time(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [cifar11]\narchs: [vgg_huge]\nattacks: [badnets, trojannn]\n"
                   "defenses: [anp, magic]\nseeds: [0]\ndefense_options: {anp: {iters: 3}}\n"
                   "train: {epochs: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert "\n" not in message
    for part in ("'cifar11'", "cifar10", "'vgg_huge'", "resnet20", "'trojannn'", "wanet",
                 "'magic'", "onp", "iters", "iterations", "epochs"):
        assert part in message, part
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    for name in ("smoke", "cifar10", "cifar10-vgg_small", "cifar10-gpu"):
        config = load_config(REPO / "benchmarks" / f"{name}.yaml")
        assert config.defenses and config.attacks
    cifar = load_config(REPO / "benchmarks" / "cifar10.yaml")
    if (REPO / "benchmarks" / "zoo").is_dir():  # the zoo's models match the grid's settings
        from trojanprune.bench.grid import ModelJob, check_models_dir, reusable_model

        check_models_dir(cifar)
        assert reusable_model(cifar, ModelJob("cifar10", "vgg_small", "badnets", 0)) is not None
        assert reusable_model(cifar, ModelJob("cifar10", "resnet20", "badnets", 0)) is not None
        assert reusable_model(cifar, ModelJob("cifar10", "resnet20", "nope", 0)) is None
    smoke = load_config(REPO / "benchmarks" / "smoke.yaml")
    from trojanprune import defenses

    assert smoke.defenses == defenses.available()
    assert smoke.clean_setting("clp").data_free
    assert smoke.clean_setting("shappruning").per_class == 1


def test_older_results_format_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / RESULTS_FILE).write_text(json.dumps({"format": RESULTS_FORMAT,
                                                "format_version": 0}) + "\n")
    with pytest.raises(DataError, match="format version 0.*refusing to mix"):
        run_bench(parse_config(TINY), out)
    (out / RESULTS_FILE).write_text('{"format": "something-else"}\n')
    with pytest.raises(DataError, match="not a trojanprune benchmark results file"):
        ResultsFile(out, parse_config(TINY))


def test_changed_settings_are_refused(tmp_path):
    ResultsFile(tmp_path, parse_config(TINY))
    with pytest.raises(ConfigError, match="other settings.*train"):
        ResultsFile(tmp_path, parse_config(dict(TINY, train={"epochs": 3})))


def test_unreachable_ray_address_is_a_clear_error():
    from trojanprune.bench.ray_runner import check_address

    start = time.perf_counter()
    with pytest.raises(TrojanPruneError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        check_address("127.0.0.1:9", timeout=2)
    assert time.perf_counter() - start < 10
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_address("no-port-here")


def test_cli_bench_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from trojanprune.cli import app

    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump(TINY))
    result = CliRunner().invoke(app, ["bench", str(config), "--out", str(tmp_path / "o"),
                                      "--ray-address", "127.0.0.1:9"])
    assert result.exit_code == 2
    assert "cannot reach the Ray cluster" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(TINY, defenses=["nope"])))
    result = CliRunner().invoke(app, ["bench", str(bad), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "unknown defense(s) 'nope'" in result.output
    assert not (tmp_path / "o2").exists()  # nothing was started
    result = CliRunner().invoke(app, ["bench", str(config), "--out", str(tmp_path / "o3"),
                                      "--only", "arch"])
    assert result.exit_code == 2 and "--only takes KEY=V1,V2" in result.output
    result = CliRunner().invoke(app, ["bench", str(config), "--out", str(tmp_path / "o3"),
                                      "--only", "arch=resnet20"])
    assert result.exit_code == 2 and "resnet20 not in this grid's archs (lenet5)" in result.output
    assert not (tmp_path / "o3").exists()
