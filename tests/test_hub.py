"""The hub round trip, offline: loading by repo id through a cache laid out as huggingface_hub lays it out
(read by huggingface_hub's own snapshot_download), and push_to_hub with only the network calls replaced."""

import copy
import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.hf_api import CommitInfo, ModelInfo
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import cptune
from cptune import CPTClassifier
from cptune.cpt.hub import (
    card_front_matter,
    hub_cache_dir,
    is_hub_id,
    offline_variable,
    peft_snippet,
    resolve_folder,
    stale_files,
)
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


GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
"""What the hub's first commit of a new repo holds (a file cptune did not write)."""


class HubStandIn:
    """Stands in for the hub's side of the HfApi calls a push makes (create_repo, create_branch, model_info,
    hf_hub_download, create_commit), on repos kept in memory as the hub keeps them: each branch a list of
    commits, each commit a new hash and the repo's files ``{path: bytes}``.

    As on the hub: a new repo starts with one commit holding ``.gitattributes``; a branch starts at main's
    head; ``create_commit`` applies its CommitOperationAdd / CommitOperationDelete objects in one new
    commit, refuses a ``parent_commit`` that is not the branch's head and a delete of a missing file, and
    returns a ``CommitInfo``. Every call is recorded in ``calls``; ``folders[i]`` is the branch's files after
    the i-th commit, written out (what a download of it gives).
    """

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, dict]] = []
        self.folders: list[Path] = []
        self.repos: dict[str, dict[str, list[tuple[str, dict[str, bytes]]]]] = {}

    def head(self, repo_id: str, revision: str | None = None) -> tuple[str, dict[str, bytes]]:
        branches = self.repos[repo_id]
        for commits in branches.values():  # a commit hash names that commit, as on the hub
            for commit in commits:
                if commit[0] == revision:
                    return commit
        return branches[revision or "main"][-1]

    def commit(self, repo_id: str, revision: str | None, files: dict[str, bytes]) -> str:
        commits = self.repos[repo_id].setdefault(revision or "main", [])
        sha = hashlib.sha1(f"{repo_id}@{revision}#{len(commits)}".encode()
                           + b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
        commits.append((sha, dict(files)))
        return sha

    def user_adds(self, repo_id: str, name: str, data: bytes, revision: str | None = None) -> None:
        """A commit made by hand (the website, git): not cptune's."""
        _, files = self.head(repo_id, revision)
        self.commit(repo_id, revision, {**files, name: data})

    def install(self, monkeypatch):
        hub = self

        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, "private": private,
                                              "exist_ok": exist_ok, **kwargs}))
            if repo_id in hub.repos and not exist_ok:
                raise AssertionError(f"{repo_id} exists")
            if repo_id not in hub.repos:
                hub.repos[repo_id] = {}
                hub.commit(repo_id, None, {".gitattributes": GITATTRIBUTES})
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
            hub.calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok, **kwargs}))
            if branch not in hub.repos[repo_id]:
                hub.repos[repo_id][branch] = [hub.head(repo_id)]

        def model_info(self, repo_id, revision=None, **kwargs):
            hub.calls.append(("model_info", {"repo_id": repo_id, "revision": revision, **kwargs}))
            sha, files = hub.head(repo_id, revision)
            return ModelInfo(id=repo_id, sha=sha, siblings=[{"rfilename": name} for name in sorted(files)])

        def hf_hub_download(self, repo_id, filename, revision=None, local_dir=None, **kwargs):
            hub.calls.append(("hf_hub_download", {"repo_id": repo_id, "filename": filename, "revision": revision}))
            _, files = hub.head(repo_id, revision)
            if filename not in files:
                raise EntryNotFoundError(f"{filename} is not in {repo_id}")
            path = Path(local_dir) / filename
            path.write_bytes(files[filename])
            return str(path)

        def create_commit(self, repo_id, operations, commit_message, revision=None, parent_commit=None, **kwargs):
            operations = list(operations)
            sha, files = hub.head(repo_id, revision)
            if parent_commit is not None and parent_commit != sha:
                raise AssertionError(f"412: {parent_commit} is not the head of {revision or 'main'}")
            files = dict(files)
            added, deleted = [], []
            for op in operations:
                if isinstance(op, CommitOperationAdd):
                    with op.as_file() as f:
                        files[op.path_in_repo] = f.read()
                    added.append(op.path_in_repo)
                elif isinstance(op, CommitOperationDelete):
                    if op.path_in_repo not in files:
                        raise AssertionError(f"404: cannot delete {op.path_in_repo}, it is not in {repo_id}")
                    del files[op.path_in_repo]
                    deleted.append(op.path_in_repo)
                else:
                    raise AssertionError(f"unexpected operation {op!r}")
            hub.calls.append(("create_commit", {"repo_id": repo_id, "commit_message": commit_message,
                                                "revision": revision, "on_head": parent_commit == sha,
                                                "added": sorted(added), "deleted": sorted(deleted), **kwargs}))
            oid = hub.commit(repo_id, revision, files)
            folder = hub.root / f"pushed-{len(hub.folders)}"
            folder.mkdir()
            for name, data in files.items():
                (folder / name).write_bytes(data)
            hub.folders.append(folder)
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                              commit_message=commit_message, commit_description="", oid=oid)

        for name, stand_in in (("create_repo", create_repo), ("create_branch", create_branch),
                               ("model_info", model_info), ("hf_hub_download", hf_hub_download),
                               ("create_commit", create_commit)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, stand_in)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # pushing is refused offline; the network calls are replaced
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
        return self

    def commits(self) -> list[dict]:
        return [args for name, args in self.calls if name == "create_commit"]


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
    hub = HubStandIn(tmp_path).install(monkeypatch)
    result = model.push_to_hub(REPO, private=True, commit_message="first", token="hf_test", metrics={"accuracy": 0.75})
    assert result.oid == hub.head(REPO)[0]
    model.save_pretrained(tmp_path / "plain")
    assert hub.calls == [
        ("create_repo", {"repo_id": REPO, "token": "hf_test", "private": True, "exist_ok": True}),
        ("model_info", {"repo_id": REPO, "revision": None}),
        ("create_commit", {"repo_id": REPO, "commit_message": "first", "revision": None, "on_head": True,
                           "added": sorted([*files_of(tmp_path / "plain"), "README.md"]), "deleted": []}),
    ]
    pushed = files_of(hub.folders[0])
    assert pushed.pop(".gitattributes") == GITATTRIBUTES  # the hub's, from the repo's creation
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read from the cache alone, not from the stand-in
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
    hub = HubStandIn(tmp_path).install(monkeypatch)
    model.push_to_hub(REPO, revision="dev")
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "model_info", "create_commit"]
    assert hub.calls[1][1] == {"repo_id": REPO, "branch": "dev", "exist_ok": True}
    assert hub.calls[3][1]["revision"] == "dev" and hub.calls[3][1]["commit_message"].startswith("Upload with cptune")
    assert "README.md" in hub.head(REPO, "dev")[1] and set(hub.head(REPO, "main")[1]) == {".gitattributes"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot push to the Hugging Face hub while HF_HUB_OFFLINE is set"):
        model.push_to_hub(REPO)
    assert len(hub.calls) == 4


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
    assert loaded.classes_ == clf.classes_ and loaded.examples_ == clf.context_examples_  # the context's alone
    assert loaded.trained_texts_ == clf.trained_texts_ and all(text in loaded.trained_texts_ for text in TEXTS)
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
    hub = HubStandIn(tmp_path).install(monkeypatch)
    metrics = {"accuracy": 0.625, "macro_f1": 0.6, "test_size": 8}
    result = clf.push_to_hub(REPO, private=False, commit_message="a tiny classifier", metrics=metrics)
    assert result.oid == hub.head(REPO)[0]
    clf.save(tmp_path / "plain")
    assert hub.calls == [
        ("create_repo", {"repo_id": REPO, "token": None, "private": False, "exist_ok": True}),
        ("model_info", {"repo_id": REPO, "revision": None}),
        ("create_commit", {"repo_id": REPO, "commit_message": "a tiny classifier", "revision": None, "on_head": True,
                           "added": sorted([*files_of(tmp_path / "plain"), "README.md"]), "deleted": []}),
    ]
    pushed = files_of(hub.folders[0])
    assert pushed.pop(".gitattributes") == GITATTRIBUTES
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
        "- `cptune_classifier.json`: the classifier: base model, template, label words, settings, the context's 4 "
        "examples (texts and labels) and salted hashes of the training texts",
        "This repo holds the 4 labelled examples of the context, texts and labels, in `cptune_classifier.json` "
        "(their tokens are also the adapter's context token ids in `adapter_config.json`). No other training row "
        "is here: the other 4 training texts are kept only as salted SHA-256 hashes (`trained_texts`), which let "
        "`cptune eval` leave them out of a test set; a hash gives no text back, but whoever holds a candidate text "
        "can check whether it was one.",
    ]
    context = {text for text, _ in clf.context_examples_}
    assert len(context) == 4
    for text in TEXTS:  # no byte of any pushed file spells a training text outside the context
        assert any(text.encode() in data for data in [*pushed.values(), card.encode()]) == (text in context), text
    lines = card.splitlines()
    for line in expected:
        assert line in lines, line
    assert config.num_examples == 4

    cache_repo(cache, REPO, hub.folders[0])  # the pushed folder, as a download leaves it in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read from the cache alone, not from the stand-in
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
    hub = HubStandIn(tmp_path).install(monkeypatch)
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


def test_stale_files_are_only_those_the_repos_manifest_lists_and_the_push_does_not_write():
    there = [".gitattributes", "README.md", "notes.md", MANIFEST_NAME, "adapter_config.json", "old.bin"]
    listed = ["adapter_config.json", "old.bin", "gone.bin"]  # gone.bin: removed by hand since
    assert stale_files(there, listed, ["adapter_config.json", "README.md", MANIFEST_NAME]) == ["old.bin"]
    assert stale_files(there, listed, ["README.md"]) == sorted([MANIFEST_NAME, "adapter_config.json", "old.bin"])
    assert stale_files(there, None, ["README.md"]) == []  # no manifest: nothing is known to be cptune's
    assert stale_files(there, ["notes.md"], [*there]) == []


def test_a_push_leaves_the_repo_as_the_classifier_is_in_one_commit_and_keeps_the_users_files(tiny_dir, tmp_path,
                                                                                            monkeypatch):
    clf = _classifier(tiny_dir, steps=1)
    hub = HubStandIn(tmp_path).install(monkeypatch)
    clf.push_to_hub(REPO, commit_message="the classifier")
    classifier_files = set(hub.head(REPO)[1])
    assert "cptune_classifier.json" in classifier_files
    hub.user_adds(REPO, "notes.md", b"# our notes\n")  # a file cptune did not write
    clf.cpt_model_.push_to_hub(REPO, commit_message="the adapter alone")  # writes no cptune_classifier.json
    clf.cpt_model_.save_pretrained(tmp_path / "adapter")
    repo = hub.head(REPO)[1]
    assert set(repo) == {*files_of(tmp_path / "adapter"), "README.md", "notes.md", ".gitattributes"}
    assert {name: repo[name] for name in files_of(tmp_path / "adapter")} == files_of(tmp_path / "adapter")
    assert repo["notes.md"] == b"# our notes\n" and repo[".gitattributes"] == GITATTRIBUTES
    first, second = hub.commits()  # one commit per push, each made on the head it read
    assert first["deleted"] == [] and first["added"] == sorted(classifier_files - {".gitattributes"})
    assert second["deleted"] == ["cptune_classifier.json"] and second["on_head"]
    assert second["added"] == sorted([*files_of(tmp_path / "adapter"), "README.md"])

    # an earlier push of another cptune wrote a file this one no longer writes (its manifest lists it);
    # the user deleted another listed file by hand: the next push deletes the first, asks nothing of the second
    manifest = json.loads(repo[MANIFEST_NAME])
    manifest["files"].update({"cptune_old.safetensors": {"bytes": 1, "sha256": "0" * 64},
                              "already_gone.json": {"bytes": 1, "sha256": "0" * 64}})
    hub.user_adds(REPO, "cptune_old.safetensors", b"x")
    hub.user_adds(REPO, MANIFEST_NAME, json.dumps(manifest).encode())
    clf.push_to_hub(REPO)
    assert hub.commits()[-1]["deleted"] == ["cptune_old.safetensors"]
    assert set(hub.head(REPO)[1]) == classifier_files | {"notes.md"}
    assert len(hub.commits()) == 3


def test_a_repo_without_a_manifest_loses_no_file_and_a_push_in_between_is_refused(tiny_dir, tmp_path, monkeypatch):
    clf = _classifier(tiny_dir, steps=1)
    hub = HubStandIn(tmp_path).install(monkeypatch)
    huggingface_hub.HfApi().create_repo(REPO, exist_ok=True)
    hub.user_adds(REPO, "model.safetensors", b"someone else's weights")
    clf.push_to_hub(REPO)
    assert hub.commits()[-1]["deleted"] == [] and hub.head(REPO)[1]["model.safetensors"] == b"someone else's weights"

    read_head = huggingface_hub.HfApi.model_info

    def head_then_a_commit_lands(self, repo_id, **kwargs):  # another push arrives between the read and the commit
        info = read_head(self, repo_id, **kwargs)
        hub.user_adds(repo_id, "late.txt", b"late")
        return info

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", head_then_a_commit_lands)
    with pytest.raises(AssertionError, match="412"):
        clf.cpt_model_.push_to_hub(REPO)
    assert "cptune_classifier.json" in hub.head(REPO)[1] and len(hub.commits()) == 1


def test_a_push_keeps_the_training_rows_only_when_asked_and_the_card_says_so(tiny_dir, tmp_path, monkeypatch):
    clf = _classifier(tiny_dir, steps=1)
    hub = HubStandIn(tmp_path).install(monkeypatch)
    clf.push_to_hub(REPO, keep_training_data=True)
    repo = hub.head(REPO)[1]
    info = json.loads(repo["cptune_classifier.json"])
    assert info["training_data"] == "kept" and [tuple(pair) for pair in info["examples"]] == clf.examples_
    card = repo["README.md"].decode().splitlines()
    assert ("This repo holds all 8 training rows, texts and labels, in `cptune_classifier.json`: it was pushed with "
            "`keep_training_data=True` (`cptune train --keep-training-data`), to reproduce the run. Anyone who can "
            "read the repo can read them.") in card
    assert ("- `cptune_classifier.json`: the classifier: base model, template, label words, settings, and all 8 "
            "training rows (texts and labels)") in card
    clf.push_to_hub(REPO)  # the default again: the rows beyond the context leave the repo's head
    info = json.loads(hub.head(REPO)[1]["cptune_classifier.json"])
    assert info["training_data"] == "context only" and len(info["examples"]) == 4 and info["training_size"] == 8


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
