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
