"""The compare grid on a tiny model: rows, report, resume after a kill, --only, errors."""

import json

import numpy as np
import pytest

from cptune.app import compare
from cptune.app.cli import main
from cptune.app.compare import append_result, make_grid, read_results
from cptune.app.report import (
    best_other_table,
    calibration_table,
    loss_table,
    paired_table,
    summary_table,
    versus_table,
)
from cptune.methods import settings_read
from tiny import save_tiny_model

GRID = ["--dataset", "rotten_tomatoes", "--shots", "2", "--seeds", "0", "1", "--methods", "zero-shot", "icl", "cpt",
        "--test-size", "4", "--steps", "2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def test_grid_report_and_resume(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_dir), *GRID, "--output", str(out)]) == 0
    rows, damaged = read_results(out / "results.jsonl")
    assert len(rows) == 6 and damaged == 0
    assert {(r["seed"], r["method"]) for r in rows} == {(s, m) for s in (0, 1) for m in ("zero-shot", "icl", "cpt")}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["test_size"] == 4 and r["data"]["sha256"]
        assert r["train_loss"] >= 0 and r["test_loss"] >= 0
        assert 0 <= r["calibrated"]["accuracy"] <= 1 and sum(map(sum, r["calibrated"]["confusion"])) == 4
        assert abs(sum(r["content_free_probs"]) - 1) < 1e-5
        assert r["encoder"] is None and r["model"] == str(tiny_dir)  # causal-LM methods use no sentence encoder
    for name in ("results.md", "accuracy.png", "gap.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| rotten_tomatoes | cpt |" in table and "(n=2)" in table
    assert "## Accuracy with contextual calibration" in table and "| icl | 2 |" in table  # paired: cpt vs icl

    # a killed run: the last line half-written. Rerun: it is discarded and only that cell reruns.
    text = (out / "results.jsonl").read_bytes()
    lines = text.splitlines(keepends=True)
    kept = b"".join(lines[:-1])
    (out / "results.jsonl").write_bytes(kept + lines[-1][: len(lines[-1]) // 2])
    rows, damaged = read_results(out / "results.jsonl")
    assert len(rows) == 5 and damaged == 1
    capsys.readouterr()
    assert main(["compare", "--model", str(tiny_dir), *GRID, "--output", str(out)]) == 0
    after = (out / "results.jsonl").read_bytes()
    assert after.startswith(kept)  # finished cells were not redone
    rows, damaged = read_results(out / "results.jsonl")
    assert len(rows) == 6 and damaged == 0
    redone = json.loads(after.splitlines()[-1])
    assert (redone["seed"], redone["method"]) == (json.loads(lines[-1])["seed"], json.loads(lines[-1])["method"])
    # a cell gives the same result inside the grid and alone (--only)
    alone = tmp_path / "alone"
    assert main(["compare", "--model", str(tiny_dir), *GRID, "--only", "seed=1,method=icl", "--output",
                 str(alone)]) == 0
    (single,) = read_results(alone / "results.jsonl")[0]
    (same,) = [r for r in rows if r["seed"] == 1 and r["method"] == "icl"]
    assert single["accuracy"] == same["accuracy"] and single["test_loss"] == same["test_loss"]


def test_append_after_damage_starts_a_new_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"dataset": "a", "shots": 1, "seed": 0, "method": "icl"}\n{"dataset": "a", "sh')
    append_result(path, {"dataset": "b", "shots": 1, "seed": 0, "method": "icl"})
    rows, damaged = read_results(path)
    assert [r["dataset"] for r in rows] == ["a", "b"] and damaged == 0


@pytest.mark.parametrize(
    "args, message",
    [(["--methods", "gpt4"], "unknown method 'gpt4'"), (["--only", "shots"], "key=value"),
     (["--only", "seed=9"], "selects no cell"), (["--shots", "0"], "argument --shots: 0 is not an integer >= 1"),
     (["--dataset", "imdb"], "imdb"), (["--test-size", "0"], "argument --test-size: 0 is not an integer >= 1"),
     (["--set", "cpt_lr"], "NAME=VALUE"),
     (["--set", "lr=1"], "NAME=VALUE with NAME one of: steps"), (["--set", "seed=3"], "give --seeds 3"),
     (["--set", "cpt_lr=fast"], "'fast' is not a valid float"),
     (["--set", "cpt_lr=-1"], "cpt_lr=-1.0 must be a finite number > 0"),
     (["--set", "length_normalize=maybe"], "not a valid bool"), (["--template", "{x}"], "{y}"),
     (["--label-words", "negative=bad"], "label 'positive' of dataset 'rotten_tomatoes' has no label word")],
)
def test_compare_mistakes(args, message, tiny_dir, tmp_path, capsys):
    code = main(["compare", "--model", str(tiny_dir), *GRID, *args, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_settings_template_and_label_words_reach_the_cells_and_guard_resume(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tuned"
    grid = ["compare", "--model", str(tiny_dir), "--dataset", "rotten_tomatoes", "--shots", "2", "--seeds", "0",
            "--methods", "cpt", "--test-size", "4", "--output", str(out)]
    tuned = ["--set", "cpt_lr=1e-4", "--set", "decay=1", "--set", "steps=2",
             "--template", "Review: {x}\\nSentiment: {y}", "--label-words", "negative=bad,positive=good"]
    assert main([*grid, *tuned]) == 0
    (row,) = read_results(out / "results.jsonl")[0]
    assert row["settings"]["cpt_lr"] == 1e-4 and row["settings"]["decay"] == 1.0 and row["settings"]["steps"] == 2
    assert row["template"] == "Review: {x}\nSentiment: {y}"
    assert row["label_words"] == {"negative": "bad", "positive": "good"}
    capsys.readouterr()
    # the same output with other settings: refused, one line, nothing appended
    before = (out / "results.jsonl").read_bytes()
    assert main([*grid, *tuned[:-2]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label_words={'negative': 'bad', 'positive': 'good'}" in err[0], err
    assert main([*grid, *tuned[2:]]) == 2
    assert "cpt_lr=0.0001, this run has cpt_lr=0.001;" in capsys.readouterr().err
    assert (out / "results.jsonl").read_bytes() == before
    assert main([*grid, *tuned]) == 0  # same settings: the done cell is skipped
    assert (out / "results.jsonl").read_bytes() == before


def test_only_filters_the_grid():
    cells = make_grid(["a", "b"], [2, 4], [0, 1], ["icl", "cpt"], only="dataset=b,shots=4")
    assert {(c.dataset, c.shots) for c in cells} == {("b", 4)} and len(cells) == 4


def _row(seed, method, accuracy, calibrated, train_loss=0.5, test_loss=0.7):
    return {"dataset": "d", "shots": 2, "seed": seed, "method": method, "accuracy": accuracy,
            "calibrated": {"accuracy": calibrated}, "train_loss": train_loss, "test_loss": test_loss}


def test_report_tables_from_known_rows():
    rows = [_row(0, "cpt", 0.8, 0.9, 0.2, 0.6), _row(1, "cpt", 0.6, 0.7, 0.4, 0.8),
            _row(0, "icl", 0.7, 0.9, 0.9, 0.9), _row(1, "icl", 0.6, 0.5, 0.7, 0.7),
            _row(2, "icl", 0.9, 0.9)]  # seed 2 has no cpt cell: not paired
    assert "| d | cpt | 0.700 ± 0.141 (n=2) |" in summary_table(rows)
    assert "| d | icl | 0.733 ± 0.153 (n=3) |" in summary_table(rows)
    assert "| d | cpt | 0.800 ± 0.141 (n=2) |" in summary_table(rows, "calibrated_accuracy")
    # cpt - icl on seeds 0 and 1: +0.1 and 0.0 -> mean +0.050, 1 win, 1 tie, 0 losses
    # (bootstrap means of two cells lie in {0, 0.05, 0.1}: the 95% interval spans the two differences)
    assert "| icl | 2 | +0.050 | [+0.000, +0.100] | 1 / 1 / 0 |" in paired_table(rows)
    assert "| icl | 2 | +0.100 | [+0.000, +0.200] | 1 / 1 / 0 |" in paired_table(rows, metric="calibrated_accuracy")
    assert "| d | 2 | icl | 2 | +0.050 |" in paired_table(rows, by=("dataset", "shots"))
    assert "| cpt | 2 | 0.300 | 0.700 | +0.400 |" in loss_table(rows)
    # calibrated - raw: cpt +0.1, +0.1; icl +0.2, -0.1, 0.0
    assert "| cpt | 2 | +0.100 | [+0.100, +0.100] | 2 / 0 / 0 |" in calibration_table(rows)
    assert "| icl | 3 | +0.033 | [" in calibration_table(rows) and "| 1 / 1 / 1 |" in calibration_table(rows)


def test_cpt_against_the_best_other_method_uses_shared_cells_and_states_the_goal():
    rows = [_row(0, "cpt", 0.80, 0), _row(1, "cpt", 0.70, 0), _row(2, "cpt", 0.90, 0),
            _row(0, "icl", 0.75, 0), _row(1, "icl", 0.705, 0), _row(2, "icl", 0.85, 0),
            _row(0, "lora", 0.60, 0), _row(1, "lora", 0.60, 0), _row(2, "lora", 0.99, 0),
            _row(3, "lora", 0.99, 0)]  # seed 3 has no cpt or icl cell: left out of every mean
    table = best_other_table(rows)
    # shared seeds 0-2: icl mean 0.768 beats lora 0.730; cpt - icl = +0.05, -0.005, +0.05 -> +0.032; the
    # lowest resampled mean (-0.005, all three picks on seed 1) has probability 1/27 > 2.5%: the low end
    assert "| d | 2 | 0.800 | icl | 0.768 | 3 | +0.032 | [-0.005, +0.050] | 2 / 0 / 1 | yes |" in table
    slightly_worse = [{**r, "accuracy": 0.685} if (r["method"], r["seed"]) == ("cpt", 1) else r for r in rows]
    assert best_other_table(slightly_worse).endswith("| [-0.020, +0.050] | 2 / 0 / 1 | no |")  # low end < -0.01


def test_each_method_against_the_same_method_of_another_grid(tmp_path, capsys):
    auto = [_row(0, "cpt", 0.80, 0), _row(1, "cpt", 0.70, 0), _row(2, "cpt", 0.60, 0), _row(0, "icl", 0.5, 0)]
    fixed = [_row(0, "cpt", 0.75, 0), _row(1, "cpt", 0.70, 0), _row(0, "icl", 0.6, 0),
             _row(3, "cpt", 0.99, 0)]  # seed 2 only in auto, seed 3 only in fixed: neither is paired
    table = versus_table(auto, fixed)
    assert "| d | 2 | cpt | 2 | +0.025 | [+0.000, +0.050] | 1 / 1 / 0 |" in table
    assert "| d | 2 | icl | 1 | -0.100 | [-0.100, -0.100] | 0 / 0 / 1 |" in table
    for name, rows in (("auto", auto), ("fixed", fixed)):
        (tmp_path / name).mkdir()
        for row in rows:
            append_result(tmp_path / name / "results.jsonl", row)
    assert main(["compare", "--report-only", "--output", str(tmp_path / "auto"), "--versus",
                 str(tmp_path / "fixed")]) == 0
    report = (tmp_path / "auto" / "results.md").read_text()
    assert f"## Against {tmp_path / 'fixed'}" in report and table in report
    (tmp_path / "empty").mkdir()
    assert main(["compare", "--report-only", "--output", str(tmp_path / "auto"), "--versus",
                 str(tmp_path / "empty")]) != 0
    err = capsys.readouterr().err
    assert "--versus" in err and "no results" in err and "Traceback" not in err
    assert (tmp_path / "auto" / "results.md").read_text() == report  # the failed call left the report alone


def test_bootstrap_interval_matches_the_normal_approximation_and_is_seeded():
    from cptune.app.report import bootstrap_interval

    rng = np.random.default_rng(1)
    diffs = rng.normal(0.05, 0.1, size=400).tolist()
    low, high = bootstrap_interval(diffs)
    half = 1.96 * np.std(diffs) / np.sqrt(len(diffs))  # the interval the central limit theorem gives
    assert low == pytest.approx(np.mean(diffs) - half, abs=0.003) and high == pytest.approx(np.mean(diffs) + half,
                                                                                           abs=0.003)
    assert bootstrap_interval(diffs) == (low, high)  # seeded: the same report twice
    assert bootstrap_interval([0.02] * 5) == pytest.approx((0.02, 0.02))
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_interval([])


def test_resume_compares_only_the_settings_each_method_reads(tiny_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    grid = ["compare", "--model", str(tiny_dir), "--dataset", "rotten_tomatoes", "--shots", "2", "--seeds", "0",
            "--test-size", "4", "--set", "steps=1", "--output", str(out)]
    assert main([*grid, "--methods", "zero-shot", "cpt"]) == 0
    before = (out / "results.jsonl").read_bytes()
    capsys.readouterr()
    # a CPT learning rate does not reach zero-shot: its cell resumes (nothing runs, nothing is appended)
    assert main([*grid, "--set", "cpt_lr=1e-4", "--methods", "zero-shot"]) == 0
    assert (out / "results.jsonl").read_bytes() == before
    # but the CPT cell was run with another learning rate: refused, naming the method and the setting
    assert main([*grid, "--set", "cpt_lr=1e-4", "--methods", "zero-shot", "cpt"]) == 2
    err = capsys.readouterr().err
    assert "holds cpt cells run with cpt_lr=0.001, this run has cpt_lr=0.0001" in err, err
    assert (out / "results.jsonl").read_bytes() == before
    assert settings_read("zero-shot") == ("length_normalize",)
    assert {"cpt_lr", "eps_input", "steps"} <= set(settings_read("cpt")) and "lora_lr" not in settings_read("cpt")
    assert settings_read("setfit") == ()


def test_rows_written_before_the_radius_setting_resume_as_absolute_and_guard_relative(tiny_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    grid = ["compare", "--model", str(tiny_dir), "--dataset", "rotten_tomatoes", "--shots", "2", "--seeds", "0",
            "--test-size", "4", "--set", "steps=1", "--methods", "cpt", "--output", str(out)]
    assert main(grid) == 0
    path = out / "results.jsonl"
    (row,) = read_results(path)[0]
    assert row["settings"]["radius"] == "absolute" and "radius" in settings_read("cpt")
    del row["settings"]["radius"]  # as a row of a grid run before the setting existed
    path.write_text(json.dumps(row) + "\n")
    before = path.read_bytes()
    capsys.readouterr()
    assert main(grid) == 0 and path.read_bytes() == before  # it ran with the default: resumed, nothing rerun
    assert main([*grid, "--set", "radius=relative"]) == 2
    assert "run with radius='absolute', this run has radius='relative'" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_auto_template_is_chosen_once_per_split_and_shared_by_its_methods(tiny_dir, tmp_path, monkeypatch):
    calls = []
    real = compare.choose_template

    def counted(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "choose_template", counted)
    out = tmp_path / "auto"
    assert main(["compare", "--model", str(tiny_dir), "--dataset", "rotten_tomatoes", "--shots", "2", "--seeds", "0",
                 "1", "--methods", "zero-shot", "icl", "--template", "auto", "--test-size", "4",
                 "--output", str(out)]) == 0
    rows = read_results(out / "results.jsonl")[0]
    assert sorted(calls) == [0, 1]  # one choice per (dataset, shots, seed), not per method
    for seed in (0, 1):
        zero, icl = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["method"], reverse=True)
        assert zero["template_choice"] == icl["template_choice"] and zero["template_choice"]["scores"]
