"""benchmarks/gpu_vs_peft.py end to end on the CPU with a tiny model: rows for both implementations, parity."""

import json
from pathlib import Path

import pytest
import torch

from conftest import DEMOS, QUERIES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
WORDS = {"pos": "positive", "neg": "negative"}  # single tokens for the tiny tokenizer, as PEFT's scoring needs


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # where the script finds cptbench and gpu_check
    import gpu_vs_peft

    return gpu_vs_peft


def test_cpu_dry_run(script, tiny_dir, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "".join(f'"{text}",{WORDS[label]}\n' for text, label in DEMOS + QUERIES))
    out = tmp_path / "result.json"
    argv = ["--model", tiny_dir, "--data", rows, "--device", "cpu", "--dtypes", "float32", "--shots", "2",
            "--batches", "2", "--steps", "1", "--test-size", "4", "--out", out]
    assert script.main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["peft"] and result["summary"]
    by_kind = {}
    for row in result["rows"]:
        by_kind.setdefault(row["kind"], []).append(row)
    assert [r["impl"] for r in by_kind["train"]] == ["cptune", "peft"]
    assert [r["impl"] for r in by_kind["classify"]] == ["cptune", "peft"]
    ours, theirs = (r["first_loss"] for r in by_kind["train"])
    assert ours == pytest.approx(theirs, rel=1e-5)
    (train,) = by_kind["train_compare"]
    assert train["float32_loss_ok"] and train["first_grad_rel_gap"] < 1e-4 and train["delta_max_abs_gap"] < 1e-5
    (classify,) = by_kind["classify_compare"]
    assert classify["single_token_labels"] and classify["same_predictions"] == 1.0
    assert classify["max_abs_score_gap"] < 1e-4
    assert all(r["examples"] == 4 for r in by_kind["classify"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_cuda_missing_skips(script, capsys):
    assert script.main(["--device", "cuda"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_cpu_dry_run_of_the_shapes_and_every_layout(script, tok, tmp_path):
    """The prepared GPU grid's code path on the CPU: a random-weight shape, every layout, the markdown table."""
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "".join(f'"{text}",{WORDS[label]}\n' for text, label in DEMOS + QUERIES))
    tok.save_pretrained(tmp_path / "tokenizer")
    out, table = tmp_path / "result.json", tmp_path / "table.md"
    layouts = ["auto", "packed", "onepass", "padded"]
    argv = ["--shapes", "tiny", "--tokenizer", tmp_path / "tokenizer", "--data", rows, "--device", "cpu",
            "--dtypes", "float32", "--shots", "2", "--batches", "1", "2", "--classify-batches", "2", "--steps", "1",
            "--test-size", "4", "--layouts", *layouts, "--out", out, "--markdown", table]
    assert script.main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    names = ["cptune", "cptune-packed", "cptune-onepass", "cptune-padded"]
    compares = [r for r in result["rows"] if r["kind"] == "train_compare"]
    assert [r["impl"] for r in compares] == names * 2  # batch 1, then batch 2
    for row in compares:  # every layout gives PEFT's loss and gradient
        assert row["float32_loss_ok"] and row["first_grad_rel_gap"] < 1e-4, row
    trained = {(r["batch"], r["impl"]): r for r in result["rows"] if r["kind"] == "train"}
    assert trained[(2, "cptune-onepass")]["layout"].startswith("onepass (chosen by the caller)")
    classified = [r for r in result["rows"] if r["kind"] == "classify_compare"]
    assert [r["impl"] for r in classified] == names
    assert all(r["max_abs_score_gap"] < 1e-4 and r["same_predictions"] == 1.0 for r in classified)
    text = table.read_text()
    assert "| tiny | float32 | 2 (" in text and all(name in text for name in names)


def test_shapes_need_a_tokenizer(script):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--shapes", "tiny", "--device", "cpu"])
    assert exit_info.value.code == 2
