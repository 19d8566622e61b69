"""Command line: a thin shell over the public functions.

Every failure prints one line, ``cptune: error: ...``: a mistake of the user's (a bad argument,
bad data, a bad or missing file) exits with status 2, a failure at run time (a NaN loss, out of
memory, an I/O error, a bug) with status 1. ``--debug`` or ``CPTUNE_DEBUG=1`` also prints the
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import fields
from pathlib import Path

from cptune.app.demo import CLASSIFIER_SUBDIR, DemoSettings, format_table, run_demo
from cptune.distributed import is_main_process
from cptune.training import NonFiniteLossError

EXIT_RUNTIME = 1
EXIT_USAGE = 2
CHECKPOINT_SUBDIR = "checkpoint"
DEBUG_ENV = "CPTUNE_DEBUG"


class UserError(Exception):
    """A mistake in the user's input, reported as one line."""


# The user's mistakes: a bad value (ValueError, which includes a damaged or mismatched file:
# cptune.cpt.saving.IncompleteSaveError) or a path that is missing, of the wrong kind or not writable.
# Everything else (NonFiniteLossError, out of memory, other OSError such as a full disk) is a run
# time failure.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
               PermissionError)


def exit_status(err: BaseException) -> int:
    """2 for a mistake of the user's, 1 for a failure at run time."""
    return EXIT_USAGE if isinstance(err, USER_ERRORS) else EXIT_RUNTIME


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its mistakes reported as one line like cptune's own."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"cptune: error: {message} (see `{self.prog} --help`)\n")


# -- demo --------------------------------------------------------------------------------------

_DEMO_HELP = {
    "model": "embedded default name, local folder, .gguf file or hub id",
    "dataset": "built-in dataset",
    "shots": "demonstrations in the context (balanced across classes)",
    "test_size": "balanced test examples, disjoint from the shots",
    "seed": "seed of the split and of training",
    "steps": "CPT optimizer steps",
    "batch_size": "queries per step",
    "lr": "AdamW learning rate",
    "eps_input": "projection epsilon of input-text tokens",
    "eps_format": "projection epsilon of template tokens",
    "decay": "loss decay factor gamma in (0, 1]",
    "output": f"folder for {CLASSIFIER_SUBDIR}/ and results.json",
}


def _add_demo(sub) -> None:
    defaults = DemoSettings()
    p = sub.add_parser("demo", help="zero-shot vs ICL vs CPT on a built-in dataset (the main job)",
                       description=DemoSettings.__doc__)
    for f in fields(DemoSettings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"{_DEMO_HELP[f.name]} (default: %(default)s)")


def _run_demo(args) -> int:
    settings = DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings)})
    print(f"cptune demo: {settings}", flush=True)
    report = run_demo(settings)
    print()
    print(f"{settings.dataset}, {settings.shots} shots, {settings.test_size} test examples, seed {settings.seed}, "
          f"model {settings.model}")
    print(format_table(report))
    print(f"classifier (a PEFT adapter folder) saved to {settings.output}/{CLASSIFIER_SUBDIR}; results in "
          f"{settings.output}/results.json")
    print(f"next: cptune predict {settings.output}/{CLASSIFIER_SUBDIR} \"a gripping film\"")
    return 0


# -- train / eval / predict -------------------------------------------------------------------

def _add_data_args(p) -> None:
    p.add_argument("--data", default="rotten_tomatoes",
                   help="built-in dataset name or a local file (default: %(default)s)")
    p.add_argument("--text-column", default=None, help="text column of a local file (default: text)")
    p.add_argument("--label-column", default=None, help="label column of a local file (default: label)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and of training (default: %(default)s)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a CPT classifier on k balanced shots and save it")
    _add_data_args(p)
    p.add_argument("--model", default="smollm2-135m", help="base model (default: %(default)s)")
    p.add_argument("--shots", type=int, default=4,
                   help="demonstrations, balanced over the classes as far as the count allows (default: %(default)s)")
    p.add_argument("--template", default=None, help="format with {x} and {y}; \\n for newline (default: the dataset's)")
    p.add_argument("--label-words", default=None, help="label=word,label=word (default: the dataset's)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="queries per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--eps-input", type=float, default=0.2, help="epsilon of input tokens (default: %(default)s)")
    p.add_argument("--eps-format", type=float, default=0.1, help="epsilon of template tokens (default: %(default)s)")
    p.add_argument("--decay", type=float, default=0.95, help="loss decay gamma in (0, 1] (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64 (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT/checkpoint")
    p.add_argument("--calibrate", action="store_true",
                   help="save the classifier with contextual calibration on (Zhao et al. 2021; default: off)")
    p.add_argument("--output", required=True, help="folder to write the classifier (a PEFT-loadable adapter)")


def _parse_label_words(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    words = {}
    for item in text.split(","):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise UserError(f"--label-words item {item!r} is not label=word (e.g. neg=negative,pos=positive)")
        words[label.strip()] = word.strip()
    return words


def _dataset_defaults(name: str) -> tuple[str, dict[str, str] | None]:
    from cptune import data

    defaults = getattr(data, "DATASET_DEFAULTS", {})
    if name in defaults:
        fmt, words = defaults[name]
        return fmt, dict(words)
    return "input: {x} output: {y}", None


def _load(args):
    from cptune.data import load_dataset

    return load_dataset(args.data, text_column=args.text_column, label_column=args.label_column)


def _run_train(args) -> int:
    from cptune.app.classifier import CPTClassifier
    from cptune.cpt.saving import check_can_save, remove_saved_files
    from cptune.data import sample_splits
    from cptune.recipe import CPTRecipe
    from cptune.training import TrainSettings

    fmt, words = _dataset_defaults(args.data)
    template = args.template.replace("\\n", "\n") if args.template else fmt
    words = _parse_label_words(args.label_words) or words
    recipe = CPTRecipe(eps_input=args.eps_input, eps_format=args.eps_format, decay=args.decay,  # checked now,
                       train=TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,  # before any
                                           seed=args.seed))  # model is loaded
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every={args.checkpoint_every} must be >= 1")
    check_can_save(args.output)
    dataset = _load(args)
    if words is None:  # every class of the data, also those the shots happen not to show
        words = {label: label for label in dataset.labels}
    shots, _, _ = sample_splits(dataset, args.shots, 0, args.seed)
    clf = CPTClassifier(args.model, template=template, labels=words, recipe=recipe, progress=True,
                        dtype=args.dtype, calibrate=args.calibrate)
    output = Path(args.output)
    checkpoint = output / CHECKPOINT_SUBDIR
    if args.resume and not checkpoint.is_dir():
        raise UserError(f"--resume: no checkpoint in {checkpoint}; run without --resume to start")
    clf.fit([ex.text for ex in shots], [ex.label for ex in shots], checkpoint_dir=checkpoint,
            checkpoint_every=args.checkpoint_every, resume=args.resume)
    if is_main_process():  # under data parallelism every process trained the same delta; one writes
        clf.save(output)
        remove_saved_files(checkpoint)  # the classifier holds the final state; only our own files go
        losses = clf.train_result.losses
        print(f"trained {len(losses)} steps (final loss {losses[-1]:.4f}); classifier saved to {output}")
    return 0


def _add_classifier_args(p) -> None:
    p.add_argument("classifier", help="folder written by `cptune train`, `cptune demo` (OUTPUT/classifier) or "
                                      "CPTClassifier.save; or a CPT adapter folder with --template and --label-words")
    p.add_argument("--model", default=None, help="base model (default: the one the classifier was trained on)")
    p.add_argument("--template", default=None,
                   help="for an adapter folder without cptune_classifier.json: its context's template")
    p.add_argument("--label-words", default=None,
                   help="for an adapter folder without cptune_classifier.json: label=word,label=word")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy and macro-F1 of a saved classifier on a balanced test set")
    _add_classifier_args(p)
    _add_data_args(p)
    p.add_argument("--test-size", type=int, default=200, help="balanced test examples (default: %(default)s)")
    p.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="contextual calibration of the label probabilities (Zhao et al. 2021); "
                        "default: as the classifier was saved")


def _run_eval(args) -> int:
    from cptune.cpt.saving import write_json_atomic
    from cptune.data import Dataset, sample_splits
    from cptune.scoring import classification_metrics

    clf = _load_classifier(args)
    dataset = _load(args)
    seen = {text for text, _ in clf.examples}
    unseen = Dataset(dataset.name, [ex for ex in dataset.examples if ex.text not in seen], dataset.labels,
                     dataset.provenance)
    _, _, test = sample_splits(unseen, 0, args.test_size, args.seed)
    missing = sorted({ex.label for ex in test} - set(clf.classes_))
    if missing:
        raise UserError(f"the data has label {missing[0]!r}, which the classifier does not know ({clf.classes_})")
    predicted = clf.predict([ex.text for ex in test])
    metrics = classification_metrics([clf.classes_.index(p) for p in predicted],
                                     [clf.classes_.index(ex.label) for ex in test], len(clf.classes_))
    report = {"classifier": str(args.classifier), "data": dataset.name, "test_size": len(test), "seed": args.seed,
              "calibrated": clf.calibrate, **metrics, "labels": clf.classes_}
    print(json.dumps({k: report[k] for k in ("accuracy", "macro_f1", "confusion", "labels")}))
    if args.output:
        write_json_atomic(Path(args.output), report)
    return 0


def _load_classifier(args):
    from cptune.app.classifier import CLASSIFIER_FILE, CPTClassifier

    folder = Path(args.classifier)
    if not folder.exists():
        raise UserError(f"classifier folder {folder} does not exist")
    if args.template is None and args.label_words is None:
        clf = CPTClassifier.load(folder, model=args.model)
    elif (folder / CLASSIFIER_FILE).is_file():
        raise UserError(f"--template and --label-words are for adapter folders; {folder} is a classifier and has "
                        f"its own ({CLASSIFIER_FILE})")
    elif args.template is None or args.label_words is None:
        raise UserError("an adapter folder needs both --template and --label-words")
    else:
        clf = CPTClassifier.from_adapter(folder, args.template.replace("\\n", "\n"),
                                         _parse_label_words(args.label_words), model=args.model)
    if args.calibrate is not None:
        clf.calibrate = args.calibrate
    return clf


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="labels and probabilities as JSON lines, for texts from arguments, a file "
                                       "(one per line) or standard input")
    _add_classifier_args(p)
    p.add_argument("texts", nargs="*", help="texts to classify (default: read --file or standard input)")
    p.add_argument("--file", default=None, help="a text file, one text per line")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="contextual calibration of the label probabilities (Zhao et al. 2021); "
                        "default: as the classifier was saved")


def _run_predict(args) -> int:
    if args.texts and args.file:
        raise UserError("give texts as arguments or --file, not both")
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"--file {path} does not exist")
        try:
            texts = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"--file {path} is not UTF-8 text") from None
    clf = _load_classifier(args)  # a wrong folder fails before waiting on standard input
    if args.texts:
        texts = list(args.texts)
    elif not args.file:
        texts = [line.rstrip("\n") for line in sys.stdin]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("no texts to classify (give arguments, --file, or lines on standard input)")
    probs = clf.predict_proba(texts)
    for text, row in zip(texts, probs, strict=True):
        best = int(row.argmax())
        print(json.dumps({"text": text, "label": clf.classes_[best],
                          "probabilities": {c: round(float(p), 6) for c, p in zip(clf.classes_, row, strict=True)}}))
    return 0


# -- datasets / compare -----------------------------------------------------------------------

def _add_datasets(sub) -> None:
    sub.add_parser("datasets", help="list the built-in datasets (offline stand-ins) and hub names")


def _run_datasets(args) -> int:
    from cptune.data import list_datasets

    print("| name | classes | size | stands in for | licence |")
    print("|---|---|---|---|---|")
    for d in list_datasets():
        size = d.get("size") if d.get("size") is not None else "(" + str(d.get("note", "not installed")) + ")"
        print(f"| {d['name']} | {d.get('num_classes', '')} | {size} | {d.get('stand_in_for') or '(hub)'} | "
              f"{d.get('licence', '')} |")
    return 0


def _add_compare(sub) -> None:
    from cptune.methods import METHODS

    p = sub.add_parser("compare", help="a grid of (dataset, shots, seed, method) cells: one JSON line each, "
                                       "resumable; a Markdown table and plots")
    p.add_argument("--dataset", nargs="+", default=["rotten_tomatoes"], help="datasets (default: %(default)s)")
    p.add_argument("--shots", nargs="+", type=int, default=[2, 4, 8], help="shot counts (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="methods (default: all six)")
    p.add_argument("--model", default="smollm2-135m", help="base model (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=200, help="balanced test examples (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of trained methods (default: 40)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a method setting, e.g. cpt_lr=1e-4 or decay=1 (repeatable; names: cptune.MethodSettings)")
    p.add_argument("--template", default=None, help="{x} and {y} format; \\n for newline (default: each dataset's)")
    p.add_argument("--label-words", default=None, help="label=word,label=word (default: each dataset's)")
    p.add_argument("--only", default=None, help="run only matching cells, e.g. dataset=subj,shots=4,seed=0,method=cpt")
    p.add_argument("--report-only", action="store_true", help="do not run cells; rebuild the table and plots")
    p.add_argument("--output", required=True, help="folder for results.jsonl, results.md, accuracy.png, gap.png")


def _method_settings(settings, items: list[str]):
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


def _run_compare(args) -> int:
    from cptune.app.compare import RESULTS_NAME, make_grid, read_results, run_grid, summary_table, write_report
    from cptune.methods import MethodSettings

    settings = _method_settings(MethodSettings(), args.set)
    if args.steps is not None:
        settings = settings.replace(steps=args.steps)
    if args.test_size < 1:
        raise UserError(f"--test-size={args.test_size} must be >= 1")
    output = Path(args.output)
    if args.report_only:
        rows, damaged = read_results(output / RESULTS_NAME)
        if not rows:
            raise UserError(f"no results in {output / RESULTS_NAME}")
    else:
        cells = make_grid(args.dataset, args.shots, args.seeds, args.methods, args.only)
        from cptune.text.template import Template

        template = args.template.replace("\\n", "\n") if args.template else None
        if template is not None:
            Template(template)  # check it before loading anything
        rows = run_grid(cells, output, model=args.model, test_size=args.test_size, settings=settings,
                        template=template, label_words=_parse_label_words(args.label_words))
    if not is_main_process():
        return 0
    write_report(rows, output)
    print(summary_table(rows))
    print(f"results: {output / RESULTS_NAME}; table and plots: {output}/results.md, accuracy.png, gap.png")
    return 0


# -- entry point ------------------------------------------------------------------------------

HANDLERS = {"demo": _run_demo, "train": _run_train, "eval": _run_eval, "predict": _run_predict,
            "datasets": _run_datasets, "compare": _run_compare}


def build_parser() -> argparse.ArgumentParser:
    """The ``cptune`` argument parser."""
    parser = OneLineParser(prog="cptune", description="Context-aware Prompt Tuning for few-shot classification")
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_datasets(sub)
    _add_compare(sub)
    for command in sub.choices.values():  # `cptune train ... --debug` as well as `cptune --debug train ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _quiet_transformers() -> None:
    """cptune reports its own progress; transformers' weight-loading bars and notices are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cptune`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    _quiet_transformers()
    try:
        return HANDLERS[args.command](args)
    except KeyboardInterrupt:
        print("cptune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (and a status) for the user
        if debug:
            traceback.print_exc()
        status = exit_status(err)
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if status == EXIT_RUNTIME and not isinstance(err, (OSError, NonFiniteLossError)):
            text = f"{type(err).__name__}: {text}" if text else type(err).__name__
        hint = "" if debug or status == EXIT_USAGE else " (run with --debug for the traceback)"
        print(f"cptune: error: {text or type(err).__name__}{hint}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
