"""Tests for every source cptune.data.load_dataset reads besides built-ins and files: Python lists, pandas
DataFrames, ``datasets`` objects, ``save_to_disk`` folders and hub ids, all offline.

Hub ids load through a real ``datasets`` cache built in ``tmp_path``: the Parquet builder of ``datasets`` prepares
local Parquet files into ``<cache>/<owner>___<name>/<config>/0.0.0/<commit sha>/<name>-<split>.arrow`` plus
``dataset_info.json``, the layout an online ``datasets.load_dataset("owner/name")`` leaves behind. Offline
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``), ``datasets.load_dataset("owner/name")`` reads exactly that cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.packaged_modules.parquet.parquet import Parquet

from cptune.data import MAX_CHARS, Dataset, Example, load_dataset, sample_splits

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
"""The commit sha a hub load would name its cache folder after."""

REVIEWS = {
    "train": {"text": ["a fine film", "dull", "great fun", "boring", "unlabelled"], "label": [1, 0, 1, 0, -1]},
    "test": {"text": ["lovely", "awful"], "label": [1, 0]},
}
REVIEW_FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def cache_hub_dataset(cache: Path, repo: str, configs: dict, features=None, work: Path | None = None) -> None:
    """Write ``repo``'s configs ({config: {split: columns}}) into a ``datasets`` cache as an online load would."""
    owner, name = repo.split("/")
    work = work or cache.parent / "parquet"
    staging = cache.parent / "staging"
    for config, splits in configs.items():
        files = {}
        for split, columns in splits.items():
            path = work / owner / name / config / f"{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(columns), path)
            files[split] = str(path)
        builder = Parquet(
            cache_dir=str(staging),
            dataset_name=name,
            config_name=config,
            config_id=config,
            hash=SNAPSHOT,
            data_files=files,
            features=features,
        )
        builder.download_and_prepare()
    # The builder of a local file has no repo id, so it writes under <name>; a hub load writes <owner>___<name>.
    cache.mkdir(parents=True, exist_ok=True)
    (staging / name).rename(cache / f"{owner}___{name}")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    cache = root / "datasets"
    cache_hub_dataset(cache, "owner/reviews", {"default": REVIEWS}, REVIEW_FEATURES)
    topics = {
        "coarse": {"train": {"content": ["stocks rise", "team wins", "bank cuts"], "topic": [0, 1, 0]}},
        "fine": {"train": {"content": ["stocks rise", "team wins", "bank cuts"], "topic": [10, 11, 12]}},
    }
    cache_hub_dataset(cache, "owner/topics", topics)
    ag_news = {
        split: {"text": ["Stocks rise. " * 60, "Team wins the cup.", f"{split} world news"], "label": [2, 1, 0]}
        for split in ("train", "test")
    }
    names = datasets.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])
    cache_hub_dataset(
        cache,
        "fancyzhx/ag_news",
        {"default": ag_news},
        datasets.Features({"text": datasets.Value("string"), "label": names}),
    )
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """Point `datasets` at the stand-in cache, offline (conftest also sets HF_HUB_OFFLINE=1 before it is imported)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hub_cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return hub_cache


# --------------------------------------------------------------------------------------------------------
# Python lists


def test_list_of_pairs():
    data = load_dataset([("great film", "pos"), ("  dull\nfilm ", "neg"), ("fun", "pos")])
    assert data.examples == [Example("great film", "pos"), Example("dull film", "neg"), Example("fun", "pos")]
    assert data.labels == ["neg", "pos"] and data.name == "examples"
    assert data.provenance["source"] == "python" and data.provenance["shape"] == "list of (text, label) pairs"
    # Rows may be lists too (as JSON gives them); labels keep their type.
    assert load_dataset([["a", 1], ["b", 0]]).labels == [0, 1]


def test_pair_of_lists():
    data = load_dataset((["good", "bad", "fine"], [1, 0, 1]))
    assert data.examples == [Example("good", 1), Example("bad", 0), Example("fine", 1)]
    assert data.labels == [0, 1] and all(type(label) is int for label in data.labels)
    assert data.provenance["shape"] == "(texts, labels) lists"
    assert load_dataset((pd.Series(["x", "y"]), pd.Series([True, False]))).labels == [False, True]
    with pytest.raises(ValueError, match="the \\(texts, labels\\) lists differ in length: 2 texts, 1 labels"):
        load_dataset((["a", "b"], ["x"]))


def test_a_list_of_two_lists_is_rows_not_columns():
    with pytest.raises(
        ValueError, match="row 0 holds 3 items, not a \\(text, label\\) pair.*tuple: \\(texts, labels\\)"
    ):
        load_dataset([["a", "b", "c"], ["x", "y", "x"]])


def test_list_of_dicts():
    rows = [{"review": "good", "stars": 5, "id": 1}, {"review": "bad", "stars": 1, "id": 2}]
    data = load_dataset(rows, text_column="review", label_column="stars")
    assert data.examples == [Example("good", 5), Example("bad", 1)] and data.labels == [1, 5]
    with pytest.raises(
        ValueError, match="text column 'text' not found in 'the list of dicts'; columns present: 'review'"
    ):
        load_dataset(rows)
    with pytest.raises(ValueError, match="row 1 is a tuple, not a dict"):
        load_dataset([{"text": "a", "label": "x"}, ("b", "y")])


def test_python_sources_refuse_what_does_not_apply():
    pairs = [("a", "x"), ("b", "y")]
    with pytest.raises(ValueError, match="a Python list has no splits; split='train' applies to hub") as e:
        load_dataset(pairs, split="train")
    _one_line(e)
    with pytest.raises(ValueError, match="a Python list has no configs; config='sst2'"):
        load_dataset(pairs, config="sst2")
    with pytest.raises(ValueError, match="list of \\(text, label\\) pairs has no columns"):
        load_dataset(pairs, text_column="review")
    assert load_dataset(pairs, default_split="train").labels == ["x", "y"]  # ignored without splits
    with pytest.raises(ValueError, match="cannot load a int as a dataset; pass a name, a path"):
        load_dataset(3)


def test_a_cptune_dataset_passes_through():
    data = Dataset("mine", [Example("a", 1), Example("b", 2)], [1, 2])
    assert load_dataset(data) is data
    with pytest.raises(ValueError, match="a cptune Dataset has no splits"):
        load_dataset(data, split="test")


# --------------------------------------------------------------------------------------------------------
# pandas


def test_dataframe():
    frame = pd.DataFrame({"text": ["good", "bad", None, "fine", "meh"], "label": [1, 0, 1, 1, None]})
    with pytest.warns(UserWarning, match="skipped 1 row with a blank 'text' and 1 row without a 'label'"):
        data = load_dataset(frame)
    # A float column (NaN made it float) of integral values gives ints.
    assert data.examples == [Example("good", 1), Example("bad", 0), Example("fine", 1)]
    assert all(type(ex.label) is int for ex in data.examples)
    assert data.provenance["source"] == "dataframe" and data.name == "dataframe"
    nullable = pd.DataFrame({"t": ["a", "b", "c"], "y": pd.array([3, pd.NA, 4], dtype="Int64")})
    with pytest.warns(UserWarning, match="1 row without a 'y'"):
        assert load_dataset(nullable, text_column="t", label_column="y").labels == [3, 4]
    with pytest.raises(
        ValueError, match="label column 'label' not found in 'the DataFrame'; columns present: 't', 'y'"
    ):
        load_dataset(nullable, text_column="t")
    with pytest.raises(ValueError, match="the DataFrame has no splits"):
        load_dataset(frame, split="train")


def test_dataframe_categorical_keeps_its_order():
    labels = pd.Categorical(["low", "high", "mid", "low"], categories=["low", "mid", "high"], ordered=True)
    data = load_dataset(pd.DataFrame({"text": ["a", "b", "c", "d"], "label": labels}))
    assert data.labels == ["low", "mid", "high"]
    assert [ex.label for ex in data.examples] == ["low", "high", "mid", "low"]


# --------------------------------------------------------------------------------------------------------
# datasets objects and save_to_disk folders


def _reviews(split: str = "train") -> datasets.Dataset:
    return datasets.Dataset.from_dict(REVIEWS[split], features=REVIEW_FEATURES)


def test_datasets_dataset_classlabel_gives_names():
    with pytest.warns(UserWarning, match="1 row without a 'label'"):  # -1: the hub's "unlabelled"
        data = load_dataset(_reviews())
    assert data.labels == ["neg", "pos"]
    assert [ex.label for ex in data.examples] == ["pos", "neg", "pos", "neg"]
    assert data.provenance["source"] == "datasets" and data.provenance["label_names"] == ["neg", "pos"]
    # The ClassLabel's order, not sorted order.
    flipped = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])})
    data = load_dataset(datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=flipped))
    assert data.labels == ["pos", "neg"] and [ex.label for ex in data.examples] == ["neg", "pos"]


def test_datasets_dataset_plain_values_keep_their_type():
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "gold": [2, 7, 2], "other": [0.5, 1.5, 2.5]})
    data = load_dataset(ds, text_column="sentence", label_column="gold")
    assert data.labels == [2, 7] and all(type(ex.label) is int for ex in data.examples)
    flags = load_dataset(datasets.Dataset.from_dict({"text": ["a", "b"], "label": [True, False]}))
    assert flags.labels == [False, True]
    with pytest.raises(ValueError, match="label column 'label' not found in 'the datasets.Dataset'; columns present"):
        load_dataset(ds, text_column="sentence")
    with pytest.raises(ValueError, match="the datasets.Dataset has no splits; split='train' applies to a DatasetDict"):
        load_dataset(ds, split="train")


def test_datasets_dataset_dict_splits():
    both = datasets.DatasetDict({"train": _reviews("train"), "test": _reviews("test")})
    test = load_dataset(both, split="test")
    assert test.examples == [Example("lovely", "pos"), Example("awful", "neg")]
    assert test.provenance["split"] == "test" and test.provenance["splits"] == {"train": 5, "test": 2}
    assert load_dataset(both, default_split="test").examples == test.examples
    with pytest.warns(UserWarning):
        assert len(load_dataset(both, split="train", default_split="test").examples) == 4  # split wins
    with pytest.raises(ValueError, match="has the splits 'train', 'test'; choose one with split=") as e:
        load_dataset(both)
    _one_line(e)
    with pytest.raises(ValueError, match="has the splits 'train', 'test' \\(the default 'validation' is not among"):
        load_dataset(both, default_split="validation")
    with pytest.raises(
        ValueError, match="split 'validation' not found in the datasets.DatasetDict; available splits: 'tr"
    ):
        load_dataset(both, split="validation")
    with pytest.raises(ValueError, match="has no configs; config='x'"):
        load_dataset(both, config="x")


def test_streaming_dataset_is_refused():
    stream = _reviews().to_iterable_dataset()
    with pytest.raises(ValueError, match="is a streaming dataset; load it without streaming=True"):
        load_dataset(stream)


@pytest.mark.filterwarnings("ignore:.*skipped")
def test_save_to_disk_folders(tmp_path):
    _reviews().save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": _reviews("train"), "test": _reviews("test")}).save_to_disk(tmp_path / "both")
    one = load_dataset(tmp_path / "one")
    assert one.labels == ["neg", "pos"] and len(one.examples) == 4 and one.name == "one"
    assert one.provenance["source"] == "disk" and one.provenance["file"] == str((tmp_path / "one").resolve())
    assert one.examples == load_dataset(_reviews()).examples
    with pytest.raises(ValueError, match="save_to_disk folder '.*one' has no splits; split='test'"):
        load_dataset(str(tmp_path / "one"), split="test")
    both = load_dataset(str(tmp_path / "both"), default_split="test")
    assert both.examples == [Example("lovely", "pos"), Example("awful", "neg")]
    assert both.provenance["source"] == "disk" and both.provenance["split"] == "test"
    assert len(load_dataset(tmp_path / "both", split="train").examples) == 4
    with pytest.raises(ValueError, match="folder '.*both' has the splits 'train', 'test' \\(the default 'valid"):
        load_dataset(tmp_path / "both", default_split="validation")
    with pytest.raises(ValueError, match="save_to_disk folder '.*both' has no configs"):
        load_dataset(tmp_path / "both", config="x")


def test_local_dataset_folder(tmp_path):
    """A folder of data files laid out like a hub dataset repository loads through datasets.load_dataset."""
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["x", "y", "x"]}), tmp_path / "repo/data/train.parquet")
    pq.write_table(pa.table({"text": ["d", "e"], "label": ["y", "x"]}), tmp_path / "repo/data/test.parquet")
    data = load_dataset(tmp_path / "repo", default_split="test")
    assert data.examples == [Example("d", "y"), Example("e", "x")]
    assert data.provenance["source"] == "folder" and data.provenance["split"] == "test" and data.name == "repo"


def test_without_the_datasets_library(monkeypatch, tmp_path):
    _reviews().save_to_disk(tmp_path / "saved")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="hub dataset 'owner/reviews' needs the `datasets` library, which is not") as e:
        load_dataset("owner/reviews")
    assert "pip install datasets" in _one_line(e)
    with pytest.raises(ValueError, match="save_to_disk folder '.*saved' needs the `datasets` library.*pip install"):
        load_dataset(tmp_path / "saved")


# --------------------------------------------------------------------------------------------------------
# Hub ids, offline through a real datasets cache


def test_hub_id_from_the_cache(offline_hub):
    with pytest.warns(UserWarning, match="1 row without a 'label'"):
        train = load_dataset("owner/reviews", split="train")
    assert train.name == "owner/reviews" and train.labels == ["neg", "pos"]
    assert [ex.label for ex in train.examples] == ["pos", "neg", "pos", "neg"]
    prov = train.provenance
    assert (prov["source"], prov["hub_id"], prov["split"], prov["package"]) == (
        "hub",
        "owner/reviews",
        "train",
        "datasets",
    )
    assert prov["version"] == datasets.__version__
    assert all(SNAPSHOT in f for f in prov["cache_files"])  # read from the cache, nothing else
    test = load_dataset("owner/reviews", default_split="test")
    assert test.examples == [Example("lovely", "pos"), Example("awful", "neg")]  # one split, never pooled
    assert len(load_dataset("owner/reviews", split="train[:2]").examples) == 2  # a datasets split expression
    with pytest.raises(ValueError, match="hub dataset 'owner/reviews' has the splits 'train', 'test'; choose one") as e:
        load_dataset("owner/reviews")
    _one_line(e)
    with pytest.raises(ValueError, match="could not load hub dataset 'owner/reviews' split 'validation': .*validation"):
        load_dataset("owner/reviews", split="validation")


def test_hub_id_config_and_columns(offline_hub):
    fine = load_dataset("owner/topics", config="fine", split="train", text_column="content", label_column="topic")
    assert fine.labels == [10, 11, 12] and fine.provenance["config"] == "fine"
    coarse = load_dataset("owner/topics", config="coarse", default_split="train", text_column="content",
                          label_column="topic")  # fmt: skip
    assert coarse.labels == [0, 1]
    with pytest.raises(ValueError, match="could not load hub dataset 'owner/topics' config 'medium'.*coarse.*fine"):
        load_dataset("owner/topics", config="medium", split="train")
    with pytest.raises(ValueError, match="could not load hub dataset 'owner/topics'.*multiple.*configurations") as e:
        load_dataset("owner/topics", split="train")
    _one_line(e)
    with pytest.raises(ValueError, match="text column 'text' not found in .*owner/topics.*columns present: 'content'"):
        load_dataset("owner/topics", config="fine", split="train")


def test_named_hub_dataset_keeps_its_layout(offline_hub):
    data = load_dataset("ag_news", default_split="test")
    assert data.name == "ag_news" and data.labels == ["World", "Sports", "Business"]
    assert [ex.label for ex in data.examples] == ["Business", "Sports", "World"]
    assert len(data.examples[0].text) <= MAX_CHARS < len("Stocks rise. " * 60)  # named datasets are truncated
    assert data.examples[2].text == "test world news"
    assert data.provenance["hub_id"] == "fancyzhx/ag_news" and data.provenance["max_chars"] == MAX_CHARS
    with pytest.raises(ValueError, match="hub dataset 'glue/sst2' is nyu-mll/glue config 'sst2'; for config 'cola'"):
        load_dataset("glue/sst2", config="cola")


def test_missing_hub_id_offline(offline_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="hub dataset 'owner/missing' is not in the local datasets cache") as e:
        load_dataset("owner/missing", split="train")
    message = _one_line(e)
    for part in (str(offline_hub), "offline mode is on (HF_HUB_OFFLINE set)", "a built-in name", ".parquet file",
                 "save_to_disk", "no local file or folder named 'owner/missing'"):  # fmt: skip
        assert part in message


def test_offline_environment_variable_end_to_end(hub_cache, tmp_path):
    """HF_DATASETS_OFFLINE and HF_DATASETS_CACHE as a user sets them, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(hub_cache), HF_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    code = ISOLATED + (
        "import json, warnings\n"
        "from cptune.data import load_dataset\n"
        "warnings.simplefilter('ignore')\n"
        "data = load_dataset('owner/reviews', default_split='train')\n"
        "try:\n"
        "    load_dataset('owner/missing', default_split='train')\n"
        "except ValueError as err:\n"
        "    message = str(err)\n"
        "print(json.dumps({'labels': [ex.label for ex in data.examples], 'message': message}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["labels"] == ["pos", "neg", "pos", "neg"]
    assert "not in the local datasets cache" in result["message"]
    assert "(HF_DATASETS_OFFLINE set)" in result["message"]


# --------------------------------------------------------------------------------------------------------
# Labels of any type through sampling; imports


def test_sample_splits_with_labels_of_any_type():
    pairs = [(f"{label!r} {i}", label) for label in ("other", 1, 2.5, 0, "1") for i in range(5)]
    data = load_dataset(pairs)
    assert data.labels == [0, 1, 2.5, "1", "other"]
    shots, extra, test = sample_splits(data, shots=5, test_size=10, seed=0, extra_train=5)
    for split, n in ((shots, 1), (extra, 1), (test, 2)):
        typed = sorted((type(ex.label).__name__, ex.label) for ex in split)
        assert typed == sorted([("int", 0), ("int", 1), ("float", 2.5), ("str", "1"), ("str", "other")] * n)
    assert sample_splits(data, shots=5, test_size=10, seed=0, extra_train=5) == (shots, extra, test)


def test_labels_equal_in_python_are_refused():
    """True == 1 and False == 0 in Python: as labels of one dataset they would merge silently."""
    with pytest.raises(ValueError, match="labels 1 and True are equal in Python") as e:
        load_dataset([("a", 1), ("b", True), ("c", 0)])
    _one_line(e)


ISOLATED = (
    "import importlib.util, sys, types\n"
    "spec = importlib.util.find_spec('cptune')\n"
    "package = types.ModuleType('cptune')\n"
    "package.__path__ = list(spec.submodule_search_locations)\n"
    "sys.modules['cptune'] = package  # cptune.data without the package __init__ (which imports the model stack)\n"
)
"""Code that makes ``import cptune.data`` run only the data package's own imports."""

HEAVY = ("torch", "transformers", "datasets", "pandas", "pyarrow", "numpy")


def test_data_package_imports_nothing_heavy():
    code = ISOLATED + (
        "import cptune.data\n"
        "cptune.data.list_datasets()\n"
        "cptune.data.load_dataset([('a', 'x'), ('b', 'y')])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name, error", [("nope", ValueError), ("data/missing.csv", FileNotFoundError),
                                         ("./missing", FileNotFoundError)])
def test_check_source_refuses_what_load_dataset_refuses_with_its_message(name, error, tmp_path, monkeypatch):
    from cptune.data import check_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as checked:
        check_source(name)
    with pytest.raises(error) as loaded:
        load_dataset(name)
    assert str(checked.value) == str(loaded.value)


def test_check_source_reads_nothing_it_accepts(tmp_path):
    from cptune.data import check_source

    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"\x00\x01")  # load_dataset would refuse it; the check leaves files to the load
    for name in ("rotten_tomatoes", "glue/sst2", "owner/name", str(broken), str(tmp_path)):
        assert check_source(name) is None


def test_a_missing_column_names_the_python_argument_and_a_shell_may_name_its_flag(tmp_path):
    from cptune.data import MissingColumnError

    path = tmp_path / "d.csv"
    path.write_text("review,label\nx,1\ny,0\n")
    with pytest.raises(MissingColumnError) as err:
        load_dataset(str(path))
    assert str(err.value).endswith("columns present: 'review', 'label' (choose it with text_column=)")
    assert err.value.message("--text-column").endswith("(choose it with --text-column)")
    assert "text_column=" not in err.value.message("--text-column")
