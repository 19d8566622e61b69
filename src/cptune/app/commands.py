"""The ``cptune`` commands: thin shells over the public functions (the parser is :mod:`cptune.app.cli`).

Only the data package is imported here at the top: ``cptune datasets`` answers without torch, and each
command that runs a model imports what it needs when it starts.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from cptune.app import demo
from cptune.app.cli import DEFAULT_MODEL, UserError
from cptune.app.trained_texts import KEPT, TrainedTexts
from cptune.data import (
    DATASET_DEFAULTS,
    FILE_FORMATS,
    ColumnClashError,
    Dataset,
    MissingColumnError,
    check_source,
    load_dataset,
    normalize_text,
    sample_splits,
)
from cptune.reporting import notice, plural

CHECKPOINT_SUBDIR = "checkpoint"
DEFAULT_TEMPLATE = "input: {x} output: {y}"
PREDICT_CHUNK = 64  # texts of standard input or a text file scored (and printed) at a time
# cptune.app.classifier.CLASSIFIER_FILE, named here to read a folder before torch loads (a test keeps them equal)
CLASSIFIER_INFO_FILE = "cptune_classifier.json"


def quiet_transformers() -> None:
    """cptune reports its own progress; transformers' weight-loading bars and notices are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_options(args) -> dict:
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map}


# -- demo --------------------------------------------------------------------------------------

def run_demo(args) -> int:
    quiet_transformers()
    settings = demo.DemoSettings(**{f.name: getattr(args, f.name) for f in fields(demo.DemoSettings)})
    print(f"cptune demo: {settings}", flush=True)
    report = demo.run_demo(settings)
    print()
    print(f"{settings.dataset}, {settings.shots} shots, {settings.test_size} test examples, seed {settings.seed}, "
          f"model {settings.model}")
    print(demo.format_table(report))
    print(f"classifier (a PEFT adapter folder) saved to {settings.output}/{demo.CLASSIFIER_SUBDIR}; results in "
          f"{settings.output}/results.json")
    print(f"next: cptune predict {settings.output}/{demo.CLASSIFIER_SUBDIR} \"a gripping film\"")
    return 0


# -- data and label words ----------------------------------------------------------------------

def parse_label_words(text: str | None) -> dict[str, str] | None:
    """``label=word,label=word`` as ``{label text: word}``; labels are matched to the data's by their text."""
    if text is None:
        return None
    words = {}
    for item in text.split(","):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise UserError(f"--label-words item {item!r} is not label=word (e.g. neg=negative,pos=positive)")
        words[label.strip()] = word.strip()
    return words


def label_words_for(labels: Iterable[Any], given: Mapping[str, str] | None) -> dict[Any, str]:
    """``{label: word}`` for the data's labels (their own values, ints kept): the given words matched by
    the label's text, else each label written as itself if every label is a word
    (:func:`cptune.text.template.label_word_problem`).

    Raises:
        UserError: a label of the data without a word, a word for a label the data does not have, or no
            words given for labels that are not words (``0``/``1``, ``LABEL_0``): the message says how to
            give them.
    """
    from cptune.text.template import check_distinct_words, words_needed_error

    labels = list(labels)
    if given is None:
        error = words_needed_error(labels, "--label-words")
        if error is not None:
            raise UserError(str(error))
        return {label: str(label) for label in labels}
    by_text = {str(k): w for k, w in given.items()}
    names = ", ".join(str(label) for label in labels)
    missing = [label for label in labels if str(label) not in by_text]
    if missing:
        raise UserError(f"--label-words has no word for label {missing[0]!r}; the data's labels: {names}")
    unknown = sorted(set(by_text) - {str(label) for label in labels})
    if unknown:
        raise UserError(f"--label-words names label {unknown[0]!r}, which the data does not have; its labels: {names}")
    words = {label: by_text[str(label)] for label in labels}
    check_distinct_words(words)  # before the model loads (their tokens are compared after)
    return words


def _format(data: str, template: str | None, label_words: str | None) -> tuple[str, dict[str, str] | None]:
    """The template asked for (``auto`` by default) and the label words asked for, else the known dataset's."""
    fmt, words = DATASET_DEFAULTS.get(data, (DEFAULT_TEMPLATE, None))
    given = parse_label_words(label_words)
    return (template.replace("\\n", "\n") if template else fmt), (given if given is not None else words)


@contextlib.contextmanager
def flag_names():
    """A missing column reported with the command line's flag (``--text-column``), not the Python argument."""
    try:
        yield
    except MissingColumnError as err:
        raise UserError(err.message(f"--{err.role}-column")) from None
    except ColumnClashError as err:
        raise UserError(err.message("--prefix")) from None


def _load(args, default_split: str) -> Dataset:
    with flag_names():
        return load_dataset(args.data, split=args.split, config=args.config, text_column=args.text_column,
                            label_column=args.label_column, default_split=default_split)


# -- train -------------------------------------------------------------------------------------

def check_model_name(name: str | None) -> None:
    """Refuse, before torch loads, a ``--model`` that is neither the embedded default, a local folder or
    ``.gguf`` file, nor a hub model in the cache or on the hub (:func:`cptune.cpt.hub.check_model_id`)."""
    if name is None or name == DEFAULT_MODEL or Path(name).expanduser().exists():
        return
    if Path(name).suffix.lower() == ".gguf" or name.startswith((".", "/", "~")):
        raise UserError(f"--model {name} is not an existing folder or .gguf file")
    from cptune.cpt.hub import check_model_id

    check_model_id(name)


def check_train_output(output: str, overwrite: bool) -> None:
    """Refuse an existing ``--output`` folder with files in it (a checkpoint of cptune's aside) unless
    ``--overwrite``: a classifier saved there, or files cptune did not write."""
    from cptune.cpt.saving import MANIFEST_NAME, check_can_save

    check_can_save(output)
    folder = Path(output)
    others = sorted(p.name for p in folder.iterdir() if p.name != CHECKPOINT_SUBDIR) if folder.is_dir() else []
    if not others or overwrite:
        return
    if MANIFEST_NAME in others:
        raise UserError(f"--output {output} already holds a classifier; pass --overwrite to replace it, or choose "
                        "another folder")
    raise UserError(f"--output {output} exists and holds files cptune did not write ({others[0]}"
                    f"{', ...' if len(others) > 1 else ''}); choose another folder, or pass --overwrite to write the "
                    "classifier there (the other files stay)")


def check_output_file(output: str, overwrite: bool) -> None:
    """Refuse an ``--output`` file that exists, unless ``--overwrite``, and one that cannot be written
    (a folder, or in a folder that does not exist): ``eval`` and ``predict --file`` check it before any work."""
    path = Path(output)
    if path.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"--output {output}: {path.parent} is not an existing folder; create it first")
    if path.exists() and not overwrite:
        raise UserError(f"--output {output} exists; pass --overwrite to replace it, or choose another file")


def run_train(args) -> int:
    # Everything the user typed is checked before torch loads (seconds), then the model (more seconds).
    from cptune.text.template import Template

    fmt, words = _format(args.data, args.template, args.label_words)
    if fmt != "auto":
        Template(fmt)
    check_train_output(args.output, args.overwrite)
    output = Path(args.output)
    checkpoint = output / CHECKPOINT_SUBDIR
    if args.resume and not checkpoint.is_dir():
        raise UserError(f"--resume: no checkpoint in {checkpoint}; run without --resume to start")
    check_model_name(args.model)
    unlabeled = _unlabeled_texts(args.unlabeled) if args.unlabeled else None  # a bad file fails before training
    dataset = _load(args, default_split="train")
    words = label_words_for(dataset.labels, words)  # every class of the data, also those a sample may miss
    examples = dataset.examples
    if args.shots is not None:
        if args.shots > len(examples):  # else sample_splits' per-class count ("500 were asked") for --shots 1000
            raise UserError(f"--shots {args.shots} is more than the {plural(len(examples), 'labelled row')} of "
                            f"{args.data}; give at most {len(examples)}, or leave --shots out to use every row")
        examples, _, _ = sample_splits(dataset, args.shots, 0, args.seed)
    if args.context_size is not None and args.context_size > len(examples):
        raise UserError(f"--context-size={args.context_size} is more than the {len(examples)} labelled examples used")

    quiet_transformers()
    from cptune.app.classifier import CPTClassifier
    from cptune.cpt.saving import remove_saved_files
    from cptune.distributed import is_main_process
    from cptune.models import load_tokenizer
    from cptune.recipe import ContextTooLongError, CPTRecipe, context_and_queries
    from cptune.training import TrainSettings

    recipe = CPTRecipe(eps_input=args.eps_input, eps_format=args.eps_format, decay=args.decay,
                       train=TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
                       radius=args.radius)
    try:
        if fmt != "auto":  # the tokenizer and config tell whether the context fits: before the weights load
            tokenizer, config = load_tokenizer(args.model)
            context_and_queries(config, tokenizer, [(ex.text, ex.label) for ex in examples], Template(fmt), words,
                                args.context_size, args.seed)
        clf = CPTClassifier(args.model, template=fmt, labels=words, recipe=recipe, context_size=args.context_size,
                            calibrate=args.calibrate, selection_budget=args.selection_budget,
                            choose_steps=args.choose_steps, **_model_options(args))
        clf.fit([ex.text for ex in examples], [ex.label for ex in examples], checkpoint_dir=checkpoint,
                checkpoint_every=args.checkpoint_every, resume=args.resume, unlabeled=unlabeled)
    except ContextTooLongError as err:  # the command line names its flag, not CPTClassifier's argument
        raise UserError(err.message("--context-size")) from None
    if is_main_process():  # under data parallelism every process trained the same delta; one writes
        clf.save(output, keep_training_data=args.keep_training_data)
        remove_saved_files(checkpoint)  # the classifier holds the final state; only our own files go
        losses = clf.train_result_.losses
        loss = f"final loss {losses[-1]:.4f}" if losses else "cross-validation kept the context untouched"
        print(f"trained {plural(len(losses), 'step')} on {plural(len(examples), 'labelled example')} ({loss}); "
              f"classifier saved to {output} {held_words(clf.data_held(args.keep_training_data))}")
    return 0


def _unlabeled_texts(name: str) -> list[str]:
    """``--unlabeled``'s texts: a text file, one text per line (as ``predict --file`` reads it), blanks skipped."""
    path = Path(name)
    if not path.is_file():
        raise UserError(f"--unlabeled {path} does not exist")
    if path.suffix.lower() in FILE_FORMATS:
        raise UserError(f"--unlabeled {path} is a {path.suffix} data file; give a text file with one text per line")
    texts = [normalize_text(line.rstrip("\n")) for line in _text_lines(path, "--unlabeled") if line.strip()]
    if not texts:
        raise UserError(f"--unlabeled {path} holds no text (one text per line)")
    return texts


def held_words(held: dict) -> str:
    """What a save holds of the training data, in words (from :meth:`CPTClassifier.data_held`)."""
    if held["training_data"] == KEPT:
        return f"with all {held['training_size']} training rows (--keep-training-data)"
    others = held["training_size"] - held["examples"]
    return (f"with the context's {held['examples']} examples"
            + (f"; the other {others} training texts only as salted hashes (--keep-training-data keeps them)"
               if others > 0 else ""))


# -- eval --------------------------------------------------------------------------------------

def check_classifier_name(name: str) -> None:
    """A local folder, or a hub repo id (``owner/name``) that CPTClassifier.load downloads (checked by its shape:
    huggingface_hub is not imported here)."""
    from cptune.cpt.hub import is_hub_id

    if Path(name).is_file():
        raise UserError(f"classifier folder {name} is a file, not a folder; give the folder `cptune train` wrote")
    if not Path(name).exists() and not is_hub_id(name):
        raise UserError(f"classifier folder {name} does not exist (nor is it a hub repo id, owner/name)")


def _load_classifier(args):
    """The classifier the arguments name; the arguments were checked before (torch loads here)."""
    quiet_transformers()
    from cptune.app.classifier import CLASSIFIER_FILE, CPTClassifier

    folder = args.classifier if not Path(args.classifier).exists() else Path(args.classifier)
    options = {**_model_options(args), "batch_size": args.batch_size}
    if args.template is None and args.label_words is None:
        clf = CPTClassifier.load(folder, model=args.model, **options)
    elif (Path(folder) / CLASSIFIER_FILE).is_file():
        raise UserError(f"--template and --label-words are for adapter folders; {folder} is a classifier and has "
                        f"its own ({CLASSIFIER_FILE})")
    elif args.template is None or args.label_words is None:
        raise UserError("an adapter folder needs both --template and --label-words")
    else:
        clf = CPTClassifier.from_adapter(folder, args.template.replace("\\n", "\n"),
                                         parse_label_words(args.label_words), model=args.model, **options)
    if args.calibrate is not None:
        clf.calibrate = args.calibrate
    return clf


def class_index(classes: list, label: Any) -> int | None:
    """The column of ``label`` among the classifier's classes: by value, else by text (``0`` and ``"0"``)."""
    if label in classes:
        return classes.index(label)
    texts = [str(c) for c in classes]
    return texts.index(str(label)) if str(label) in texts else None


def rows_to_score(classes: list, trained, dataset: Dataset, test_size: int | None, seed: int,
                  name: str | None) -> tuple[list, list[int], int]:
    """:func:`evaluate`'s rows, their classes' columns, and how many rows were left out as training texts.

    Raises:
        UserError: a label not in ``classes``, nothing left to score, or a bad ``test_size``.
    """
    rows = [ex for ex in dataset.examples if ex.text not in trained]
    left_out = len(dataset.examples) - len(rows)
    if not rows:
        raise UserError(f"every row of {name or dataset.name} was used to train the classifier; nothing left to "
                        "evaluate")
    if test_size is not None:
        if test_size < 1 or test_size > len(rows):
            raise UserError(f"--test-size={test_size} must be from 1 to the {len(rows)} rows available")
        rows = random.Random(seed).sample(rows, test_size)
    gold = [class_index(classes, ex.label) for ex in rows]
    unknown = next((ex.label for ex, g in zip(rows, gold, strict=True) if g is None), None)
    if unknown is not None:
        raise UserError(f"the data has label {unknown!r}, which the classifier does not know ({classes})")
    return rows, gold, left_out


def check_eval_rows(folder: str, dataset: Dataset, test_size: int | None, seed: int, name: str) -> None:
    """:func:`rows_to_score`'s refusals made from a local classifier folder's file before the model loads (a
    label the classifier does not know, every row used to train it: 20 s sooner with the default model). A hub
    id, or a file this cannot read, is left to :func:`evaluate`, which reports what is wrong after the load."""
    try:
        info = json.loads((Path(folder) / CLASSIFIER_INFO_FILE).read_text(encoding="utf-8"))
        classes = [label for label, _ in info["labels"]]
        trained = TrainedTexts.from_json(info["trained_texts"]) if "trained_texts" in info else frozenset()
    except (OSError, ValueError, KeyError, TypeError):
        return
    rows_to_score(classes, trained, dataset, test_size, seed, name)


def evaluate(clf, dataset: Dataset, test_size: int | None = None, seed: int = 0, name: str | None = None) -> dict:
    """Score every row of ``dataset`` whose text the classifier was not trained on (or a seeded sample of
    ``test_size`` of them); accuracy, macro-F1, per-class precision/recall/F1/support, confusion.
    ``name``: the data as the user gave it, for messages (default: the dataset's name).

    A row is left out when its text, whitespace-normalised, is one of the training texts: a saved classifier
    knows them by their salted hashes (:class:`cptune.app.trained_texts.TrainedTexts`), not their texts.

    Raises:
        UserError: a label the classifier does not know, nothing left to score, or a bad ``test_size``.
    """
    from cptune.scoring import classification_metrics, per_class_metrics

    classes = clf.classes_
    rows, gold, left_out = rows_to_score(classes, clf.trained_texts_, dataset, test_size, seed, name)
    predicted = clf.predict_proba([ex.text for ex in rows]).argmax(axis=1).tolist()
    metrics = classification_metrics(predicted, gold, len(classes))
    per_class = [{"label": label, **row} for label, row in zip(classes, per_class_metrics(metrics["confusion"]),
                                                                strict=True)]
    return {**metrics, "per_class": per_class, "labels": classes, "test_size": len(rows),
            "left_out_trained": left_out, "rows": len(dataset.examples)}


def format_metrics(report: dict) -> str:
    """The metrics as Markdown tables: a summary, per class, the confusion matrix."""
    lines = [f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} on {report['test_size']} rows",
             "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for row in report["per_class"]:
        lines.append(f"| {row['label']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | "
                     f"{row['support']} |")
    labels = [str(label) for label in report["labels"]]
    lines += ["", "confusion (rows: true label, columns: predicted)", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for label, counts in zip(labels, report["confusion"], strict=True):
        lines.append(f"| **{label}** | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


def run_eval(args) -> int:
    from cptune.cpt.saving import write_json_atomic

    check_classifier_name(args.classifier)
    if args.data is None:
        raise UserError("eval needs the test data: --data (or --test-data) FILE, built-in name or hub id")
    if args.output:
        check_output_file(args.output, args.overwrite)  # before the scoring, not after it
    check_model_name(args.model)
    dataset = _load(args, default_split="test")  # a bad --data fails before torch and the model load
    if args.test_size is not None and args.test_size > len(dataset.examples):  # (evaluate() also counts the rows
        raise UserError(f"--test-size {args.test_size} is more than the {plural(len(dataset.examples), 'row')} "
                        f"of {args.data}")  # left out as training texts, which needs the classifier)
    if args.label_words is None:  # given label words are checked against the classifier's labels on loading
        check_eval_rows(args.classifier, dataset, args.test_size, args.seed, args.data)
    clf = _load_classifier(args)
    metrics = evaluate(clf, dataset, args.test_size, args.seed, name=args.data)
    if metrics["left_out_trained"]:
        notice("left out %d of %s: their text was used to train the classifier", metrics["left_out_trained"],
               plural(metrics["rows"], "row"))
    report = {"classifier": str(args.classifier), "data": args.data, "split": args.split,
              "seed": args.seed if args.test_size else None, "calibrated": clf.calibrate, **metrics}
    print(json.dumps(report) if args.json else format_metrics(report))
    if args.output:
        write_json_atomic(Path(args.output), report)
    return 0


# -- predict -----------------------------------------------------------------------------------

def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        if line.strip():
            chunk.append(line.rstrip("\n"))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _text_lines(path: Path, option: str = "--file") -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError:
        raise UserError(f"{option} {path} is not UTF-8 text") from None


def run_predict(args) -> int:
    if args.texts and args.file:
        raise UserError("give texts as arguments or --file, not both")
    path = Path(args.file) if args.file else None
    on_ray = args.ray is not None
    if path is not None and not (path.is_file() or (on_ray and path.is_dir())):
        raise UserError(f"--file {path} does not exist" if not path.exists() else
                        f"--file {path} is a folder; a folder of data files is read with --ray only")
    annotate = path is not None and (path.suffix.lower() in FILE_FORMATS or path.is_dir())
    if on_ray and not annotate:
        raise UserError(f"--ray annotates a data --file ({', '.join(FILE_FORMATS)}, or a folder of them) into --output")
    if annotate and not args.output:
        raise UserError(f"--file {path} is a {path.suffix} data file: give --output FILE for the annotated copy "
                        "(plain text files, one text per line, print JSON lines)")
    if args.output and not annotate:
        raise UserError(f"--output is for annotating a data --file ({', '.join(FILE_FORMATS)})")
    if args.prefix and not annotate:
        raise UserError("--prefix names the columns added to an annotated --file; give --file and --output")
    if annotate:
        from cptune.app.annotate import check_annotation

        check_output_file(args.output, args.overwrite)
        if not path.is_dir():
            with flag_names():
                check_annotation(path, args.output, text_column=args.text_column)  # suffixes, paths, CSV header
    check_classifier_name(args.classifier)
    check_model_name(args.model)
    if on_ray:
        return _predict_on_ray(args, path)
    clf = _load_classifier(args)  # a wrong folder fails before waiting on standard input
    if annotate:
        from cptune.app.annotate import annotate_file

        with flag_names():  # a JSONL row without the column is found while annotating
            annotate_file(clf, path, args.output, text_column=args.text_column, batch_size=args.batch_size,
                          prefix=args.prefix)
        return 0  # annotate_file said how many rows it annotated and how many it left blank
    lines = args.texts if args.texts else (_text_lines(path) if path is not None else sys.stdin)
    if lines is sys.stdin and sys.stdin.isatty():  # `cptune predict FOLDER` typed alone would wait in silence
        notice("reading texts from standard input, one per line; end with Ctrl-D (or give texts as arguments)")
    printed, counts = 0, [0] * len(clf.classes_)  # texts given each class, for share_note
    for texts in _chunks(lines, PREDICT_CHUNK):
        probs = clf.predict_proba([normalize_text(t) for t in texts])  # as training data and annotated files are
        for text, row in zip(texts, probs, strict=True):
            best = int(row.argmax())
            counts[best] += 1
            print(json.dumps({"text": text, "label": clf.classes_[best],
                              "probabilities": {str(c): round(float(p), 6)
                                                for c, p in zip(clf.classes_, row, strict=True)}}), flush=True)
        printed += len(texts)
    if not printed:
        raise UserError("no texts to classify (give arguments, --file, or lines on standard input)")
    from cptune.app.annotate import note_shares

    note_shares(clf, counts)
    return 0


def _predict_on_ray(args, path: Path) -> int:
    """``predict --file --ray``: the workers load the classifier by its folder's path (no model loads here)."""
    from cptune.app.onray import SavedClassifier, annotate_file_ray, require_ray

    require_ray()  # one line naming the extra's pip command when ray is missing
    if args.template is not None or args.label_words is not None or args.device_map is not None:
        raise UserError("--ray loads a classifier folder on each worker; --template, --label-words and --device-map "
                        "are not available with it")
    quiet_transformers()
    loader = SavedClassifier(str(args.classifier), model=args.model, device=args.device, dtype=args.dtype,
                             batch_size=args.batch_size, calibrate=args.calibrate)
    with flag_names():
        annotate_file_ray(loader, path, args.output, text_column=args.text_column, prefix=args.prefix,
                          workers=args.ray_workers,
                          threads=args.ray_threads, gpus=args.ray_gpus, address=args.ray or None)
    return 0


# -- serve -------------------------------------------------------------------------------------

def run_serve(args) -> int:
    """``cptune serve``: the names checked in a second, before the socket, the web stack and torch; then
    :func:`cptune.app.serve.run`."""
    from cptune.app import serve

    serve.check_options(args)
    check_classifier_name(args.classifier)
    check_model_name(args.model)
    return serve.run(args)


# -- datasets / compare ------------------------------------------------------------------------

def run_datasets(args) -> int:
    from cptune.data import list_datasets

    print("| name | classes | size | stands in for | licence |")
    print("|---|---|---|---|---|")
    for d in list_datasets():
        size = d.get("size") if d.get("size") is not None else "(" + str(d.get("note", "not installed")) + ")"
        print(f"| {d['name']} | {d.get('num_classes', '')} | {size} | {d.get('stand_in_for') or '(hub)'} | "
              f"{d.get('licence', '')} |")
    return 0


def method_settings(settings, items: list[str]):
    """``settings`` with each ``NAME=VALUE`` of ``--set`` applied, the value read as the field's type."""
    types = {f.name: type(getattr(settings, f.name)) for f in fields(settings)}
    changes = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if name == "seed":
            raise UserError(f"--set {item!r}: each cell's seed comes from --seeds; give --seeds {text or 'N'}")
        if not sep or name not in types:
            names = ", ".join(n for n in types if n != "seed")
            raise UserError(f"--set {item!r} is not NAME=VALUE with NAME one of: {names}")
        kind = types[name]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text.lower() in ("true", "1")
            elif kind is type(None):  # a text field whose default is None (pt_init_text)
                value = None if text.lower() == "none" else text
            else:
                value = kind(text)
        except ValueError:
            raise UserError(f"--set {item!r}: {text!r} is not a valid {kind.__name__}") from None
        changes[name] = value
    return settings.replace(**changes)


def run_compare(args) -> int:
    # The parser checked the methods and counts; the data names, template and label words are checked here,
    # before cptune.app.compare imports torch (seconds).
    from cptune.text.template import Template

    template = args.template.replace("\\n", "\n") if args.template else None
    label_words = parse_label_words(args.label_words)
    if not args.report_only:
        for name in args.data:
            check_source(name)
        check_model_name(args.model)
        if template is not None and template != "auto":
            Template(template)
    quiet_transformers()
    from cptune.app.compare import RESULTS_NAME, make_grid, read_results, run_grid
    from cptune.app.report import summary_table, write_report
    from cptune.distributed import is_main_process
    from cptune.methods import MethodSettings

    settings = method_settings(MethodSettings(), args.set)
    if args.steps is not None:
        settings = settings.replace(steps=args.steps)
    output = Path(args.output)
    versus = None
    if args.versus is not None:
        other, _ = read_results(Path(args.versus) / RESULTS_NAME)
        if not other:
            raise UserError(f"--versus {args.versus}: no results in {Path(args.versus) / RESULTS_NAME}")
        versus = (str(args.versus), other)
    if args.report_only:
        rows, damaged = read_results(output / RESULTS_NAME)
        if not rows:
            raise UserError(f"no results in {output / RESULTS_NAME}")
    else:
        cells = make_grid(args.data, args.shots, args.seeds, args.methods, args.only)
        options = {"model": args.model, "test_size": args.test_size, "settings": settings, "template": template,
                   "label_words": label_words, "train_size": args.train_size,
                   "model_options": _model_options(args)}
        if args.ray is None:
            rows = run_grid(cells, output, **options)
        else:
            rows = _compare_on_ray(args, cells, output, options)
    if not is_main_process():
        return 0
    write_report(rows, output, versus)
    print(summary_table(rows))
    print(f"results: {output / RESULTS_NAME}; table and plots: {output}/results.md, accuracy.png, gap.png")
    return 0


def _compare_on_ray(args, cells, output: Path, options: dict) -> list[dict]:
    """``compare --ray``: every cell a Ray task; a failed cell is reported and the others go on, then the first
    failure is raised, so the exit status is the one a serial run stopping at that cell gives."""
    from cptune.app.onray import require_ray, run_grid_ray

    require_ray()
    rows, failures = run_grid_ray(cells, output, **options, address=args.ray or None,
                                  cpus_per_cell=args.ray_cpus_per_cell, gpus_per_cell=args.ray_gpus_per_cell)
    if failures:
        notice("%s failed (their lines above); the others are in %s; run the same command again to retry the failed",
               plural(len(failures), "cell"), output / "results.jsonl")
        raise failures[0][1]
    return rows
