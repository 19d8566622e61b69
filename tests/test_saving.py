"""Saving writes only its own files, with the umask's permissions, and survives SIGKILL at any point.

Real files on disk throughout: a user's folder with unrelated files and subfolders survives every
kind of save (adapter, checkpoint, classifier, demo, train/compare outputs) with contents and modes
intact; a save killed between files leaves the old adapter, the new one, or a documented refusal.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import cptune
from conftest import DEMOS, LABEL_WORDS, TEMPLATE
from cptune.app.classifier import CPTClassifier
from cptune.app.cli import main
from cptune.app.compare import append_result
from cptune.app.demo import DemoSettings, run_demo
from cptune.app.report import write_report
from cptune.cpt.files import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME
from cptune.cpt.model import load_adapter
from cptune.cpt.saving import (
    MANIFEST_NAME,
    IncompleteSaveError,
    check_manifest,
    prepare_folder,
    remove_saved_files,
    save_files,
    write_json_atomic,
)
from tiny import tiny_model, tiny_tokenizer

TRAIN = ["--data", "rotten_tomatoes", "--shots", "4", "--batch-size", "2", "--steps", "2"]


def _users_folder(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Fill ``folder`` with files and subfolders of various modes; return their snapshot."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.csv").write_text("text,label\nfine,pos\n")
    (folder / ".hidden").write_text("secret")
    (folder / "run.sh").write_text("#!/bin/sh\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.txt").write_text("nested")
    (folder / "checkpoint-500").mkdir()  # a Trainer's checkpoint beside the adapter
    (folder / "checkpoint-500" / "adapter_config.json").write_text("{}")
    os.chmod(folder / "data.csv", 0o640)
    os.chmod(folder / ".hidden", 0o600)
    os.chmod(folder / "run.sh", 0o755)
    os.chmod(folder / "sub" / "nested.txt", 0o604)
    os.chmod(folder / "sub", 0o750)
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """``{relative path: (mode, bytes or None for a folder)}`` of everything under ``folder``, itself included."""
    out = {".": (stat.S_IMODE(folder.stat().st_mode), None)}
    for path in folder.rglob("*"):
        out[str(path.relative_to(folder))] = (stat.S_IMODE(path.stat().st_mode),
                                              None if path.is_dir() else path.read_bytes())
    return out


def _untouched(before: dict, folder: Path) -> None:
    after = _snapshot(folder)
    for name, (mode, data) in before.items():
        assert name in after, f"{name} was removed"
        assert after[name][0] == mode, f"{name}: mode {oct(after[name][0])}, was {oct(mode)}"
        assert after[name][1] == data, f"{name} was rewritten"


def _cpt_model(seed=0):
    model = cptune.get_cpt_model(tiny_model("llama"), cptune.build_context(DEMOS, TEMPLATE, tiny_tokenizer(),
                                                                           LABEL_WORDS).to_config())
    with torch.no_grad():
        model.prompt_encoder.delta.normal_(0, 0.01, generator=torch.Generator().manual_seed(seed))
        model.project_()
    return model


def _classifier(base_and_tok):
    clf = CPTClassifier(base_and_tok, template=TEMPLATE, labels=LABEL_WORDS,
                        train=cptune.TrainSettings(steps=1, batch_size=2, lr=1e-2))
    return clf.fit([t for t, _ in DEMOS], [label for _, label in DEMOS])


def _cell_row(method: str, accuracy: float) -> dict:
    return {"dataset": "rotten_tomatoes", "shots": 4, "seed": 0, "method": method, "accuracy": accuracy,
            "macro_f1": accuracy, "train_loss": 1.0, "test_loss": 1.5, "fit_seconds": 1.0, "score_seconds": 1.0}


# -- every kind of save leaves the user's files alone ------------------------------------------


def _save_adapter(folder, tiny_dir):
    _cpt_model().save_pretrained(folder)
    return [CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, MANIFEST_NAME]


def _save_checkpoint(folder, tiny_dir):
    queries = cptune.render_queries(DEMOS, TEMPLATE, tiny_tokenizer(), LABEL_WORDS)
    cptune.train(_cpt_model(), queries, cptune.TrainSettings(steps=2, batch_size=2), checkpoint_dir=folder,
                 checkpoint_every=1, progress=False)
    return [CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, MANIFEST_NAME]


def _save_classifier(folder, tiny_dir):
    _classifier((tiny_model("llama"), tiny_tokenizer())).save(folder)
    return [CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, MANIFEST_NAME, "cptune_classifier.json"]


def _save_demo(folder, tiny_dir):
    run_demo(DemoSettings(model=str(tiny_dir), test_size=4, steps=2, output=str(folder)), progress=False)
    return ["results.json", "classifier"]


def _save_train_cli(folder, tiny_dir):
    assert main(["train", "--model", str(tiny_dir), *TRAIN, "--checkpoint-every", "1", "--output", str(folder),
                 "--overwrite"]) == 0  # a folder of the user's files needs it
    return [CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, MANIFEST_NAME, "cptune_classifier.json"]


def _save_compare_outputs(folder, tiny_dir):
    for method, accuracy in (("icl", 0.6), ("cpt", 0.7)):
        append_result(folder / "results.jsonl", _cell_row(method, accuracy))
    write_report([_cell_row("icl", 0.6), _cell_row("cpt", 0.7)], folder)
    return ["results.jsonl", "results.md", "accuracy.png", "gap.png"]


SAVES = {"adapter": _save_adapter, "checkpoint": _save_checkpoint, "classifier": _save_classifier,
         "demo": _save_demo, "train-cli": _save_train_cli, "compare": _save_compare_outputs}


@pytest.mark.parametrize("kind", list(SAVES))
def test_every_save_leaves_the_users_files_untouched(kind, tiny_dir, tmp_path):
    folder = tmp_path / "project"
    before = _users_folder(folder)
    written = SAVES[kind](folder, tiny_dir)
    _untouched(before, folder)
    new = sorted(set(_snapshot(folder)) - set(before))
    assert {Path(name).parts[0] for name in new} == set(written), new
    assert not [name for name in new if Path(name).name.startswith(".")], f"temporary files left: {new}"
    SAVES[kind](folder, tiny_dir)  # saving again over its own files still leaves the user's alone
    _untouched(before, folder)


def test_train_removes_only_its_own_checkpoint_files(tiny_dir, tmp_path):
    out = tmp_path / "clf"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "mine.txt").write_text("the user's")
    assert main(["train", "--model", str(tiny_dir), *TRAIN, "--checkpoint-every", "1", "--output", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["mine.txt"]
    out2 = tmp_path / "clf2"
    assert main(["train", "--model", str(tiny_dir), *TRAIN, "--checkpoint-every", "1", "--output", str(out2)]) == 0
    assert not (out2 / "checkpoint").exists()  # a checkpoint folder of cptune's own goes once trained


def test_remove_saved_files_keeps_a_folder_changed_since(tmp_path):
    save_files(tmp_path / "a", {"x.bin": b"1", "y.bin": b"2"})
    (tmp_path / "a" / "x.bin").write_bytes(b"changed")
    assert remove_saved_files(tmp_path / "a") is False
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [MANIFEST_NAME, "x.bin", "y.bin"]


# -- permissions -------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_modes_follow_the_umask(umask, file_mode, dir_mode, tiny_dir, tmp_path):
    old = os.umask(umask)
    try:
        adapter = tmp_path / "a" / "b"
        _cpt_model().save_pretrained(adapter)
        clf_dir = tmp_path / "clf"
        _classifier((tiny_model("llama"), tiny_tokenizer())).save(clf_dir)
        write_json_atomic(tmp_path / "r" / "results.json", {"x": 1})
        write_report([_cell_row("cpt", 0.7)], tmp_path / "cmp")
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", adapter, clf_dir, tmp_path / "r", tmp_path / "cmp"):
        assert stat.S_IMODE(folder.stat().st_mode) == dir_mode, folder
        for path in folder.iterdir():
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) == file_mode, f"{path}: {oct(path.stat().st_mode)}"


# -- clear errors ------------------------------------------------------------------------------


def test_saving_to_a_file_is_refused(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("a file of the user's")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        _cpt_model().save_pretrained(target)
    with pytest.raises(NotADirectoryError, match="a part of that path is a file"):
        _cpt_model().save_pretrained(target / "inner")
    assert target.read_text() == "a file of the user's"


def test_saving_into_a_folder_that_cannot_be_written_is_refused(tiny_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "data.csv").write_text("x")
    os.chmod(locked, 0o555)
    immutable = False
    if os.geteuid() == 0:  # root writes through modes; an immutable folder stops it where the fs allows
        immutable = subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
        if not immutable:
            os.chmod(locked, 0o755)
            pytest.skip("running as root where `chattr +i` is not available: no folder root cannot write")
    try:
        with pytest.raises(PermissionError, match="not writable|permission denied"):
            _cpt_model().save_pretrained(locked)
        assert sorted(p.name for p in locked.iterdir()) == ["data.csv"]
        assert main(["train", "--model", str(tiny_dir), *TRAIN, "--output", str(locked / "sub")]) == 2
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        os.chmod(locked, 0o755)


def test_prepare_folder_creates_parents(tmp_path):
    assert prepare_folder(tmp_path / "x" / "y").is_dir()


# -- what a load sees after an interrupted save -------------------------------------------------


def test_a_mix_of_two_saves_is_refused_and_names_the_file(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _cpt_model(seed=1).save_pretrained(first)
    _cpt_model(seed=2).save_pretrained(second)
    shutil.copy(second / WEIGHTS_NAME, first / WEIGHTS_NAME)  # what a save killed after one rename leaves
    with pytest.raises(IncompleteSaveError, match=f"{WEIGHTS_NAME} does not match {MANIFEST_NAME}"):
        cptune.CPTModel.from_pretrained(tiny_model("llama"), first)


def test_a_file_the_last_save_did_not_write_is_refused(tmp_path):
    folder = tmp_path / "clf"
    _classifier((tiny_model("llama"), tiny_tokenizer())).save(folder)
    _cpt_model().save_pretrained(folder)  # a plain adapter save over a classifier: its description is stale
    assert check_manifest(folder)
    with pytest.raises(IncompleteSaveError, match="cptune_classifier.json is not part of the last save"):
        CPTClassifier.load(folder, model=(tiny_model("llama"), tiny_tokenizer()))


def test_damaged_manifest_is_refused(tmp_path):
    _cpt_model().save_pretrained(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(IncompleteSaveError, match="is damaged"):
        cptune.CPTModel.from_pretrained(tiny_model("llama"), tmp_path)


def _context_of(folder: Path, base) -> tuple[torch.Tensor, torch.Tensor]:
    """What cptune loads from ``folder`` and what PEFT would prepend (its ``prompt_embeddings``)."""
    model = load_adapter(base, folder)
    with torch.no_grad():
        ours = model.context_embeddings().squeeze(0).float()
    return ours, load_file(str(folder / WEIGHTS_NAME))["prompt_embeddings"].float()


@pytest.mark.parametrize("old_has_manifest", [True, False], ids=["cptune-folder", "peft-folder"])
def test_sigkill_at_seeded_points_of_a_save_leaves_old_new_or_refused(old_has_manifest, tiny_dir, tmp_path):
    """A real process is killed with SIGKILL just before a seeded choice of the save's file-system
    events (see tests/killed_save.py). Each folder must then load as the old adapter or the new one,
    in cptune and in PEFT's view (adapter_model.safetensors) alike, or be refused with
    IncompleteSaveError; the user's file beside it is untouched."""
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    old = tmp_path / "old"
    before = _users_folder(old)
    cptune.get_cpt_model(base, cptune.build_context(DEMOS, TEMPLATE, tiny_tokenizer(), LABEL_WORDS).to_config()
                         ).save_pretrained(old)
    if not old_has_manifest:  # a folder PEFT wrote: no manifest, no resume state
        (old / MANIFEST_NAME).unlink()
        (old / STATE_NAME).unlink()
    old_context, _ = _context_of(old, base)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    script = Path(__file__).with_name("killed_save.py")
    run = subprocess.run([sys.executable, str(script), str(tiny_dir), str(tmp_path), "7", "6"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    plan = json.loads((tmp_path / "points.json").read_text())
    new_context = load_file(str(tmp_path / "new.safetensors"))["context"]
    assert not torch.allclose(old_context, new_context)
    seen = {}
    for point in plan["points"]:
        where = f"killed before event {point['point']} ({point['event']}) of {plan['events']}"
        assert point["killed"], f"the save finished before it could be {where}"
        folder = tmp_path / point["folder"]
        _untouched(before, folder)
        try:
            ours, peft_view = _context_of(folder, base)
        except IncompleteSaveError:
            seen[point["point"]] = "refused"
            continue
        for name, expected in (("old", old_context), ("new", new_context)):
            if torch.equal(ours, expected):
                assert torch.allclose(peft_view, expected, atol=1e-6), f"cptune loads {name}, PEFT sees a mix; {where}"
                seen[point["point"]] = name
                break
        else:
            pytest.fail(f"the folder loads as neither the old nor the new adapter; {where}")
    last_manifest = max(i for i, event in enumerate(plan["events"]) if event == f"replace {MANIFEST_NAME}")
    assert seen[0] == "old", f"killed before the first event, the old adapter must load ({seen})"
    # all new files in place, the manifest not yet renamed: the old manifest refuses them; a foreign
    # folder got the new manifest first, so there the new adapter is already complete
    expected = "refused" if old_has_manifest else "new"
    assert seen[last_manifest] == expected, f"killed before the last manifest rename: {seen}"


# -- what a save holds of the training data ------------------------------------------------------

PRIVATE_ROWS = [(f"ticket {i}: the {word} broke again", "pos" if i % 2 else "neg")
                for i, word in enumerate(["printer", "router", "laptop", "screen", "phone", "badge",
                                          "scanner", "mouse", "keyboard", "monitor", "dock", "camera"])]


def _fit_private(tiny_dir) -> CPTClassifier:
    """12 labelled rows, a 4-shot context."""
    clf = CPTClassifier(str(tiny_dir), template=TEMPLATE, labels=LABEL_WORDS, context_size=4,
                        train=cptune.TrainSettings(steps=1, batch_size=4, lr=1e-2))
    return clf.fit([t for t, _ in PRIVATE_ROWS], [label for _, label in PRIVATE_ROWS])


def _bytes_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _spelled(data: dict[str, bytes], text: str) -> bool:
    """Whether any file holds ``text`` as UTF-8 or as a JSON string would write it."""
    forms = {text.encode(), json.dumps(text).encode(), json.dumps(text, ensure_ascii=False).encode()}
    return any(form in blob for blob in data.values() for form in forms)


def test_a_save_holds_the_contexts_examples_and_only_hashes_of_the_other_texts(tiny_dir, tmp_path):
    clf = _fit_private(tiny_dir)
    context = {text for text, _ in clf.context_examples_}
    assert len(context) == 4 and len(clf.examples_) == 12
    clf.save(tmp_path / "clf")
    files = _bytes_of(tmp_path / "clf")
    for text, _ in PRIVATE_ROWS:  # every byte of every file: the 8 rows outside the context are nowhere
        assert _spelled(files, text) == (text in context), text
    info = json.loads(files["cptune_classifier.json"])
    assert info["training_data"] == "context only" and info["training_size"] == 12
    assert [tuple(pair) for pair in info["examples"]] == clf.context_examples_
    record = info["trained_texts"]
    assert record["hash"] == "sha256" and len(bytes.fromhex(record["salt"])) == 16
    assert len(record["hashes"]) == 12 and record["hashes"] == sorted(record["hashes"])
    config = json.loads(files[CONFIG_NAME])
    assert len({(code - 1) // 4 for code in config["cpt_tokens_type_mask"] if code > 0}) == 4  # 4 demonstrations

    loaded = CPTClassifier.load(tmp_path / "clf")
    assert loaded.examples_ == clf.context_examples_ == loaded.context_examples_
    assert loaded.holds_training_data_ is False and loaded.training_size_ == 12
    for text, _ in PRIVATE_ROWS:
        assert text in loaded.trained_texts_ and f"  {text.replace(' ', chr(10))} " in loaded.trained_texts_
    assert "ticket 0: the printer broke" not in loaded.trained_texts_ and "a new text" not in loaded.trained_texts_
    assert (loaded.predict_proba(["a new text"]) == clf.predict_proba(["a new text"])).all()
    loaded.save(tmp_path / "again")  # the same salt, so the same bytes
    assert _bytes_of(tmp_path / "again") == files
    with pytest.raises(ValueError, match="loaded from a save that holds only its context's 4 examples, not the 12"):
        loaded.save(tmp_path / "kept", keep_training_data=True)
    assert not (tmp_path / "kept").exists()
    other = _fit_private(tiny_dir)  # another fit, another salt: its hashes match none of these
    assert other.trained_texts_.salt != clf.trained_texts_.salt
    assert not other.trained_texts_.hashes & clf.trained_texts_.hashes


def test_keep_training_data_saves_every_row_and_loads_them_back(tiny_dir, tmp_path):
    clf = _fit_private(tiny_dir)
    clf.save(tmp_path / "kept", keep_training_data=True)
    files = _bytes_of(tmp_path / "kept")
    assert all(_spelled(files, text) for text, _ in PRIVATE_ROWS)
    info = json.loads(files["cptune_classifier.json"])
    assert info["training_data"] == "kept" and [tuple(pair) for pair in info["examples"]] == clf.examples_
    loaded = CPTClassifier.load(tmp_path / "kept")
    assert loaded.examples_ == clf.examples_ and loaded.holds_training_data_
    assert loaded.context_examples_ == clf.context_examples_ and loaded.trained_texts_ == clf.trained_texts_
    assert loaded.data_held() == {"training_data": "context only", "examples": 4, "training_size": 12}
    assert loaded.data_held(True) == {"training_data": "kept", "examples": 12, "training_size": 12}
    with pytest.raises(ValueError, match="keep_training_data='yes' must be True or False"):
        clf.save(tmp_path / "bad", keep_training_data="yes")


def test_a_classifier_saved_with_every_row_before_training_data_existed_still_loads(tiny_dir, tmp_path, capsys):
    """``cptune_classifier.json`` as cptune wrote it until now: every row in ``examples``, no hashes."""
    from cptune.app.classifier import CLASSIFIER_FILE
    from cptune.cpt.files import save_adapter

    clf = _fit_private(tiny_dir)
    info = json.loads(json.dumps(clf._description()))
    for key in ("training_data", "training_size", "trained_texts"):
        del info[key]
    info["examples"] = [list(pair) for pair in clf.examples_]
    save_adapter(clf.cpt_model_, tmp_path / "old", extra_json={CLASSIFIER_FILE: info})
    loaded = CPTClassifier.load(tmp_path / "old")
    assert loaded.examples_ == clf.examples_ and loaded.holds_training_data_ and loaded.training_size_ == 12
    assert loaded.context_examples_ == clf.context_examples_  # drawn again as fit drew them
    assert all(text in loaded.trained_texts_ for text, _ in PRIVATE_ROWS)

    data = tmp_path / "test.csv"  # eval still leaves out every training text, context or not
    rows = [*PRIVATE_ROWS[:6], ("an unseen ticket about the fax", "neg"), ("another one", "pos")]
    data.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "old"), "--data", str(data), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["left_out_trained"] == 6 and "left out 6 of 8 rows" in out.err

    loaded.save(tmp_path / "resaved")  # saved again by this version: the context's rows alone
    files = _bytes_of(tmp_path / "resaved")
    context = {text for text, _ in clf.context_examples_}
    assert all(_spelled(files, text) == (text in context) for text, _ in PRIVATE_ROWS)
    assert main(["eval", str(tmp_path / "resaved"), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["left_out_trained"] == 6


def test_a_damaged_training_data_record_is_refused_with_one_line(tiny_dir, tmp_path):
    from cptune.app.classifier import CLASSIFIER_FILE
    from cptune.cpt.files import save_adapter

    clf = _fit_private(tiny_dir)
    for key, value, message in (("training_data", "everything", "training_data='everything' is none of"),
                                ("trained_texts", {"hash": "md5"}, "trained_texts must be a sha256 record")):
        info = {**clf._description(), key: value}
        save_adapter(clf.cpt_model_, tmp_path / key, extra_json={CLASSIFIER_FILE: info})
        with pytest.raises(ValueError, match=message) as err:
            CPTClassifier.load(tmp_path / key)
        assert "\n" not in str(err.value) and CLASSIFIER_FILE in str(err.value)


def test_trained_text_hashes_are_the_documented_sha256_of_salt_and_normalised_text():
    import hashlib

    from cptune.app.trained_texts import TrainedTexts

    salt = "00" * 15 + "ff"
    trained = TrainedTexts.of(["  a\tjoy\n of a film ", "a bore"], salt=salt)
    expected = hashlib.sha256(bytes.fromhex(salt) + b"a joy of a film").hexdigest()  # computed here, by hand
    assert expected in trained.hashes and len(trained) == 2
    assert "a joy of a film" in trained and "a joy of a  film" in trained and "a joy" not in trained
    record = trained.to_json()
    assert record["hashes"] == sorted(record["hashes"]) and TrainedTexts.from_json(record) == trained
    for bad in ({**record, "salt": "xyz"}, {**record, "hashes": ["abc"]}, {**record, "normalization": "none"}):
        with pytest.raises(ValueError):
            TrainedTexts.from_json(bad)
