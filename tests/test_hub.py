"""The hub round trip, offline: loading by repo id through a cache laid out as huggingface_hub lays it out
(read by huggingface_hub's own snapshot_download), and push_to_hub with only the network calls replaced."""

import copy
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.errors import RepositoryNotFoundError
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import cptune
from cptune import CPTClassifier
from cptune.cpt.hub import card_front_matter, hub_cache_dir, is_hub_id, offline_variable, peft_snippet, resolve_folder
from cptune.cpt.saving import MANIFEST_NAME, IncompleteSaveError
from cptune.training import TrainSettings, train
from tiny import tiny_model

# The HTTP client huggingface_hub's errors carry: httpx2 from huggingface_hub 2 on, httpx before (the oldest set).
http = importlib.import_module("httpx2" if int(huggingface_hub.__version__.split(".")[0]) >= 2 else "httpx")

REPO = "owner/tiny-cpt"
TEMPLATE = "Review: {x}\nSentiment: {y}"
LABEL_WORDS = {"pos": "positive", "neg": "negative"}
TEXTS = ["a gripping, funny and moving film", "dull, lifeless and far too long", "the best movie of the year",
         "a waste of time", "the actors shine", "the plot is thin", "wonderful", "terrible, bad"]
LABELS = ["pos", "neg"] * 4
NEW = ["great", "far too long and dull", "a joy"]
CFG = dict(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.9, opt_projection_epsilon=0.4,
           opt_projection_format_epsilon=0.2)


def cache_repo(cache: Path, repo_id: str, folder: Path, ref: str = "main") -> str:
    """Lay ``folder``'s files out in ``cache`` as huggingface_hub keeps a downloaded snapshot; return its commit.

    ``models--owner--name/blobs/<sha256>`` holds each file's bytes, ``snapshots/<commit>/<file>`` is a relative
    link to its blob, and ``refs/<ref>`` holds the commit hash (no newline, as huggingface_hub writes it).
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files) + ref.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / p.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache named by HF_HUB_CACHE, offline (both read when cptune calls the hub, not at import)."""
    folder = tmp_path / "hub-cache"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def _trained_adapter(context, queries, steps: int = 3, seed: int = 0):
    base = tiny_model("llama")
    torch.manual_seed(seed)
    model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(**CFG))
    train(model, queries, TrainSettings(steps=steps, batch_size=3, lr=5e-2, seed=seed), progress=False)
    return base, model


class HubRecorder:
    """Stands in for the hub's side of HfApi.create_repo / create_branch / upload_folder: records each call and
    copies the folder it is given (the temporary folder is gone once push_to_hub returns)."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, dict]] = []
        self.folders: list[Path] = []

    def install(self, monkeypatch):
        recorder = self

        def create_repo(self, repo_id, **kwargs):
            recorder.calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **kwargs}))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, **kwargs):
            recorder.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs):
            copy_ = recorder.root / f"pushed-{len(recorder.folders)}"
            shutil.copytree(kwargs["folder_path"], copy_)
            recorder.folders.append(copy_)
            recorder.calls.append(("upload_folder", {k: v for k, v in kwargs.items() if k != "folder_path"}))
            return f"commit {len(recorder.folders)}"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # pushing is refused offline; the network calls are replaced
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
        return self


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def front_matter(card: str) -> dict:
    """The card's YAML metadata, parsed (pyyaml is a huggingface_hub dependency)."""
    yaml = pytest.importorskip("yaml")
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


# -- resolving names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, hub", [
    ("owner/name", True), ("HuggingFaceTB/SmolLM2-135M", True), ("a_b/c.d-e", True),
    ("name", False), ("./owner/name", False), ("/owner/name", False), ("~/name", False), ("a/b/c", False),
    ("owner/na--me", False), ("owner/..", False), (".hidden/name", False), ("owner/", False), ("", False),
])
def test_hub_ids_are_owner_slash_name(name, hub):
    assert is_hub_id(name) is hub


def test_cache_and_offline_are_read_at_call_time(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert offline_variable() == "TRANSFORMERS_OFFLINE"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline_variable() == "HF_HUB_OFFLINE"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert offline_variable() is None


def test_a_local_folder_wins_over_the_hub_and_a_missing_path_is_not_looked_up(context, queries, cache, tmp_path,
                                                                              monkeypatch):
    base, model = _trained_adapter(context, queries)
    model.save_pretrained(tmp_path / "other")
    cache_repo(cache, REPO, tmp_path / "other")  # the cached repo holds another adapter
    model.prompt_encoder.delta.data.mul_(2)
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(tmp_path / REPO)  # ./owner/tiny-cpt exists: it is the one loaded
    loaded = cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO)
    assert torch.equal(loaded.context_embeddings(), model.context_embeddings())
    with pytest.raises(ValueError, match="revision='v2' is for hub repos, but owner/tiny-cpt is a local folder"):
        cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO, revision="v2")
    for missing in ("./nowhere/adapter", str(tmp_path / "nowhere"), "a/b/c"):  # not repo ids: the old error
        assert resolve_folder(missing) == Path(missing)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            cptune.CPTModel.from_pretrained(copy.deepcopy(base), missing)


# -- CPTModel ------------------------------------------------------------------------------------


def test_cpt_model_loads_by_repo_id_and_revision_from_the_cache(context, queries, cache, tmp_path):
    base, model = _trained_adapter(context, queries)
    model.save_pretrained(tmp_path / "v1")
    _, other = _trained_adapter(context, queries, steps=5, seed=1)
    other.save_pretrained(tmp_path / "v2")
    cache_repo(cache, REPO, tmp_path / "v1")
    commit = cache_repo(cache, REPO, tmp_path / "v2", ref="v2")
    for revision, expected in ((None, model), ("main", model), ("v2", other), (commit, other)):
        loaded = cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO, revision=revision)
        assert torch.equal(loaded.context_embeddings(), expected.context_embeddings()), revision
    assert not torch.equal(model.context_embeddings(), other.context_embeddings())
    resumed = cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO, is_trainable=True)
    assert torch.equal(resumed.prompt_encoder.delta, model.prompt_encoder.delta)
    assert resumed.prompt_encoder.delta.requires_grad
    explicit = cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO, cache_dir=cache)
    assert torch.equal(explicit.context_embeddings(), model.context_embeddings())


def test_offline_a_repo_missing_from_the_cache_is_one_clear_line(context, queries, cache, tmp_path):
    base, model = _trained_adapter(context, queries, steps=1)
    for revision in (None, "v3"):
        with pytest.raises(FileNotFoundError) as err:
            cptune.CPTModel.from_pretrained(copy.deepcopy(base), "owner/absent", revision=revision)
        message = str(err.value)
        assert "\n" not in message
        assert "owner/absent" in message and f"revision {revision or 'main'}" in message
        assert "HF_HUB_OFFLINE" in message and str(cache) in message
    model.save_pretrained(tmp_path / "v1")
    cache_repo(cache, REPO, tmp_path / "v1")
    with pytest.raises(FileNotFoundError, match=r"owner/tiny-cpt \(revision v3\) is not in the Hugging Face cache"):
        cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO, revision="v3")


def test_online_a_repo_the_hub_does_not_have_is_one_clear_line(context, queries, cache, monkeypatch):
    """Online, snapshot_download asks the hub for the repo; only that call is replaced (by the hub's 404)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    asked = []

    def not_found(self, repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("revision")))
        request = http.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Repository Not Found", response=http.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", not_found)
    base = tiny_model("llama")
    with pytest.raises(FileNotFoundError) as err:
        cptune.CPTModel.from_pretrained(base, "owner/absent")
    assert asked == [("owner/absent", "main")]
    assert str(err.value) == ("owner/absent is neither a local folder nor a hub repo this account can read "
                              "(a private repo needs `hf auth login` or token=)")


def test_a_cached_snapshot_gets_the_manifest_check(context, queries, cache, tmp_path):
    base, model = _trained_adapter(context, queries, steps=1)
    model.save_pretrained(tmp_path / "v1")
    (tmp_path / "v1" / "README.md").write_text("# a card the manifest does not list\n")
    commit = cache_repo(cache, REPO, tmp_path / "v1")
    cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO)  # an extra README.md is fine
    weights = cache / "models--owner--tiny-cpt" / "snapshots" / commit / "adapter_model.safetensors"
    blob = weights.resolve()
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IncompleteSaveError, match=f"adapter_model.safetensors does not match {MANIFEST_NAME}"):
        cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO)


def test_cpt_model_push_sends_the_save_plus_a_card_and_loads_back(context, queries, cache, tmp_path, monkeypatch):
    base, model = _trained_adapter(context, queries)
    hub = HubRecorder(tmp_path).install(monkeypatch)
    result = model.push_to_hub(REPO, private=True, commit_message="first", token="hf_test", metrics={"accuracy": 0.75})
    assert result == "commit 1"
    assert hub.calls == [
        ("create_repo", {"repo_id": REPO, "token": "hf_test", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": REPO, "commit_message": "first", "revision": None}),
    ]
    model.save_pretrained(tmp_path / "plain")
    pushed = files_of(hub.folders[0])
    card = pushed.pop("README.md").decode()
    assert pushed == files_of(tmp_path / "plain")  # exactly a local save's files and bytes, plus the card
    assert front_matter(card) == {"library_name": "cptune", "tags": ["cpt", "few-shot", "peft"]}  # no hub base model
    cfg = model.config
    for line in (f"# {REPO}", f"- context: {cfg.num_examples} demonstrations, {cfg.num_virtual_tokens} tokens",
                 "- projection radii (epsilon): 0.4 for input text, 0.2 for template tokens",
                 "- loss: label tokens weighted by decay 0.9 per demonstration back from the query",
                 "| accuracy | 0.7500 |", f"Made with cptune {cptune.__version__}.",
                 f'model = cptune.CPTModel.from_pretrained(base, "{REPO}")  # base: the causal LM named above',
                 f'model = PeftModel.from_pretrained(base, "{REPO}")',
                 "- `README.md`: this card (not in the manifest)"):
        assert line in card.splitlines(), line

    cache_repo(cache, REPO, hub.folders[0])  # what was pushed, as a download leaves it in the cache
    loaded = cptune.CPTModel.from_pretrained(copy.deepcopy(base), REPO)
    assert torch.equal(loaded.context_embeddings(), model.context_embeddings())
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), hub.folders[0]).eval()
    batch = {"input_ids": queries["input_ids"], "attention_mask": queries["attention_mask"]}
    with torch.no_grad():
        ours, peft_logits = model(**batch).logits, theirs(**batch).logits
    assert torch.allclose(ours, peft_logits, atol=1e-5), (ours - peft_logits).abs().max()


def test_saving_the_same_adapter_twice_gives_the_same_bytes(context, queries, tmp_path):
    """The hub stores what a save writes: the same adapter must not look changed (safetensors alone orders
    its metadata differently from call to call)."""
    _, model = _trained_adapter(context, queries, steps=1)
    saves = []
    for i in range(6):
        model.save_pretrained(tmp_path / str(i))
        saves.append(files_of(tmp_path / str(i)))
    assert all(save == saves[0] for save in saves)
    loaded = cptune.CPTModel.from_pretrained(tiny_model("llama"), tmp_path / "0", is_trainable=True)
    assert torch.equal(loaded.prompt_encoder.delta, model.prompt_encoder.delta)


def test_push_to_a_branch_creates_it_and_offline_push_is_refused(context, queries, tmp_path, monkeypatch):
    _, model = _trained_adapter(context, queries, steps=1)
    hub = HubRecorder(tmp_path).install(monkeypatch)
    model.push_to_hub(REPO, revision="dev")
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[1][1] == {"repo_id": REPO, "branch": "dev", "exist_ok": True}
    assert hub.calls[2][1]["revision"] == "dev" and hub.calls[2][1]["commit_message"].startswith("Upload with cptune")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot push to the Hugging Face hub while HF_HUB_OFFLINE is set"):
        model.push_to_hub(REPO)
    assert len(hub.calls) == 3


# -- CPTClassifier -------------------------------------------------------------------------------


def _classifier(tiny_dir, seed: int = 0, steps: int = 2) -> CPTClassifier:
    clf = CPTClassifier(str(tiny_dir), template=TEMPLATE, labels=LABEL_WORDS, context_size=4,
                        train=TrainSettings(steps=steps, batch_size=4, lr=5e-2, seed=seed))
    return clf.fit(TEXTS, LABELS)


def test_classifier_loads_by_repo_id_and_revision_and_predicts_as_saved(tiny_dir, cache, tmp_path):
    clf = _classifier(tiny_dir)
    clf.save(tmp_path / "v1")
    other = _classifier(tiny_dir, seed=1, steps=4)
    other.save(tmp_path / "v2")
    cache_repo(cache, REPO, tmp_path / "v1")
    commit = cache_repo(cache, REPO, tmp_path / "v2", ref="v2")
    loaded = CPTClassifier.load(REPO)
    assert loaded.classes_ == clf.classes_ and loaded.examples_ == clf.examples_
    np.testing.assert_array_equal(loaded.predict_proba(NEW), clf.predict_proba(NEW))
    for revision in ("v2", commit):
        np.testing.assert_array_equal(CPTClassifier.load(REPO, revision=revision).predict_proba(NEW),
                                      other.predict_proba(NEW))
    assert not np.array_equal(clf.predict_proba(NEW), other.predict_proba(NEW))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = cptune.CPTModel.from_pretrained(base, REPO)  # the classifier's adapter, on its own
    assert torch.equal(model.context_embeddings(), clf.cpt_model_.context_embeddings())


def test_the_command_line_predicts_and_evaluates_by_repo_id(tiny_dir, cache, tmp_path, capsys):
    from cptune.app.cli import main

    clf = _classifier(tiny_dir)
    clf.save(tmp_path / "v1")
    cache_repo(cache, REPO, tmp_path / "v1")
    capsys.readouterr()
    assert main(["predict", REPO, *NEW]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["label"] for row in rows] == clf.predict(NEW)
    data = tmp_path / "test.jsonl"
    gold = [clf.classes_[i % 2] for i in range(len(NEW))]
    data.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in zip(NEW, gold, strict=True)))
    assert main(["eval", REPO, "--data", str(data), "--json"]) == 0
    right = sum(p == g for p, g in zip(clf.predict(NEW), gold, strict=True))
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(right / len(NEW))
    assert main(["predict", "no-such-folder", "x"]) == 2
    assert "does not exist (nor is it a hub repo id" in capsys.readouterr().err


def test_classifier_missing_from_the_cache_offline_or_from_the_disk(tiny_dir, cache):
    with pytest.raises(FileNotFoundError) as err:
        CPTClassifier.load("owner/absent", revision="v1")
    assert str(err.value) == (f"owner/absent is not a local folder, and hub repo owner/absent (revision v1) is not in "
                              f"the Hugging Face cache {cache} while HF_HUB_OFFLINE is set; download it once online "
                              "or unset HF_HUB_OFFLINE")
    with pytest.raises(FileNotFoundError, match="classifier folder nowhere/at/all does not exist"):
        CPTClassifier.load("nowhere/at/all")


def test_classifier_push_sends_the_save_plus_its_card_and_loads_back_by_repo_id(tiny_dir, cache, tmp_path,
                                                                               monkeypatch):
    clf = _classifier(tiny_dir)
    hub = HubRecorder(tmp_path).install(monkeypatch)
    metrics = {"accuracy": 0.625, "macro_f1": 0.6, "test_size": 8}
    assert clf.push_to_hub(REPO, private=False, commit_message="a tiny classifier", metrics=metrics) == "commit 1"
    assert hub.calls == [
        ("create_repo", {"repo_id": REPO, "token": None, "private": False, "exist_ok": True}),
        ("upload_folder", {"repo_id": REPO, "commit_message": "a tiny classifier", "revision": None}),
    ]
    clf.save(tmp_path / "plain")
    pushed = files_of(hub.folders[0])
    card = pushed.pop("README.md").decode()
    assert pushed == files_of(tmp_path / "plain")  # exactly the files and bytes of a plain save, plus the card
    assert set(json.loads(pushed[MANIFEST_NAME])["files"]) == set(pushed) - {MANIFEST_NAME}  # the card is not listed

    assert front_matter(card) == {"library_name": "cptune", "pipeline_tag": "text-classification",
                                  "tags": ["cpt", "few-shot", "peft"]}  # a local base model is no hub base_model
    config = clf.cpt_model_.config
    expected = [
        f"# {REPO}",
        f"Made with cptune {cptune.__version__}.",
        f"- base model: `{tiny_dir}`",
        '- template: `"Review: {x}\\nSentiment: {y}"`, demonstrations separated by `"\\n"`',
        f"- context: 4 demonstrations, {config.num_virtual_tokens} tokens",
        "- projection radii (epsilon): 0.2 for input text, 0.1 for template tokens",
        "- loss: label tokens weighted by decay 0.95 per demonstration back from the query",
        "- training: 8 labelled examples as queries, 2 steps, batch size 4, AdamW lr 0.05 (linear schedule, "
        "weight decay 0, 0 warm-up steps), seed 0",
        "- scoring: not calibrated",
        '| "pos" | "positive" |',
        '| "neg" | "negative" |',
        "| accuracy | 0.6250 |",
        "| macro_f1 | 0.6000 |",
        "| test_size | 8 |",
        f'clf = CPTClassifier.load("{REPO}")',
        f'cptune predict {REPO} "a gripping film"',
        f'base, tokenizer = cptune.load_model("{tiny_dir}")  # the model it was trained on',
        f'model = PeftModel.from_pretrained(base, "{REPO}")',
        "- `README.md`: this card (not in the manifest)",
        "- `cptune_classifier.json`: the classifier: base model, template, label words, settings, and its training "
        "examples (texts and labels)",
    ]
    lines = card.splitlines()
    for line in expected:
        assert line in lines, line
    assert config.num_examples == 4

    cache_repo(cache, REPO, hub.folders[0])  # the pushed folder, as a download leaves it in the cache
    loaded = CPTClassifier.load(REPO)
    np.testing.assert_array_equal(loaded.predict_proba(NEW), clf.predict_proba(NEW))

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)  # the card's PEFT recipe, on the local copy
    theirs = PeftModel.from_pretrained(base, hub.folders[0]).eval()
    batch = AutoTokenizer.from_pretrained(tiny_dir)(NEW, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = clf.cpt_model_(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        peft_logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, peft_logits, atol=1e-5), (ours - peft_logits).abs().max()


def test_a_recorded_evaluation_is_saved_loaded_and_written_into_the_card(tiny_dir, tmp_path, monkeypatch):
    clf = _classifier(tiny_dir, steps=1)
    clf.evaluation_ = {"accuracy": 0.75, "test_size": 4}
    clf.save(tmp_path / "saved")
    loaded = CPTClassifier.load(tmp_path / "saved")
    assert loaded.evaluation_ == {"accuracy": 0.75, "test_size": 4}
    hub = HubRecorder(tmp_path).install(monkeypatch)
    loaded.push_to_hub(REPO)
    card = (hub.folders[0] / "README.md").read_text().splitlines()
    assert "| accuracy | 0.7500 |" in card and "| test_size | 4 |" in card
    loaded.push_to_hub(REPO, metrics={"accuracy": 0.5})  # given metrics replace the recorded ones in the card
    card = (hub.folders[1] / "README.md").read_text().splitlines()
    assert "| accuracy | 0.5000 |" in card and "| test_size | 4 |" not in card
    assert _classifier(tiny_dir, steps=1).evaluation_ is None  # none unless someone records one


def test_a_fresh_process_with_the_hub_variables_set_loads_by_repo_id(tiny_dir, tmp_path):
    """As a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE set before Python starts, nothing passed explicitly."""
    clf = _classifier(tiny_dir)
    clf.save(tmp_path / "saved")
    cache = tmp_path / "user-cache"
    cache_repo(cache, REPO, tmp_path / "saved")
    code = (f"from cptune import CPTClassifier; import json; "
            f"print(json.dumps(CPTClassifier.load({REPO!r}).predict_proba({NEW!r}).tolist()))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.array(json.loads(done.stdout.splitlines()[-1]), dtype=np.float32),
                                  clf.predict_proba(NEW))


def test_the_card_names_a_hub_base_model_and_loads_it_with_transformers():
    assert front_matter(card_front_matter("HuggingFaceTB/SmolLM2-135M-Instruct", "text-classification")) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "cptune",
        "pipeline_tag": "text-classification", "tags": ["cpt", "few-shot", "peft"]}
    for local in ("smollm2-135m", "/models/tiny", "./owner/name"):
        assert "base_model" not in front_matter(card_front_matter(local))
    assert peft_snippet("HuggingFaceTB/SmolLM2-135M-Instruct", REPO).splitlines() == [
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
        'base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")',
        f'model = PeftModel.from_pretrained(base, "{REPO}")', "```"]
