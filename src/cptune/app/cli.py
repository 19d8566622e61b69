"""Command line: the parser and the error policy; the commands themselves are in :mod:`cptune.app.commands`.

This module imports only the standard library, so ``cptune --help``, ``cptune COMMAND --help``,
``cptune --version`` and ``cptune datasets`` answer at once; a command that runs a model imports
torch and transformers when it starts.

Every failure prints one line, ``cptune: error: ...``: a mistake of the user's (a bad argument,
bad data, a bad or missing file) exits with status 2, a failure at run time (a NaN loss, out of
memory, an I/O error, a bug) with status 1. ``--debug`` or ``CPTUNE_DEBUG=1`` also prints the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
import traceback
from dataclasses import fields

from cptune import __version__, reporting
from cptune.app.demo import CLASSIFIER_SUBDIR, RADIUS_CHOICES, DemoSettings

EXIT_RUNTIME = 1
EXIT_USAGE = 2
DEBUG_ENV = "CPTUNE_DEBUG"
DEFAULT_MODEL = "smollm2-135m"  # cptune.models.DEFAULT_MODEL, not imported here (it loads torch); tests compare
METHOD_NAMES = ("zero-shot", "icl", "cpt", "pt", "ipt", "lora")  # cptune.methods.METHODS, likewise
ENCODER_METHOD_NAMES = ("setfit", "embedding-lr")  # cptune.methods.ENCODER_METHODS, likewise


class UserError(Exception):
    """A mistake in the user's input, reported as one line."""


# The user's mistakes: a bad value (ValueError, which includes a damaged or mismatched file:
# cptune.cpt.saving.IncompleteSaveError) or a path that is missing, of the wrong kind or not writable.
# Everything else (NonFiniteLossError, out of memory, other OSError such as a full disk) is a run
# time failure.
# A missing extra (ImportError naming its pip command) is the user's to fix too (README: exit 2).
USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
               PermissionError, ImportError)


def exit_status(err: BaseException) -> int:
    """2 for a mistake of the user's, 1 for a failure at run time."""
    return EXIT_USAGE if isinstance(err, USER_ERRORS) else EXIT_RUNTIME


_NUMBER = re.compile(r"-\d|-\.\d")  # "-1", "-.5": a negative value, not an option (none of ours looks like one)
_REQUIRED = "the following arguments are required"  # the start of argparse's message for missing arguments


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its mistakes reported as one line like cptune's own; an unknown option is named even when
    a required argument is missing too (argparse checks the required ones first and would hide it)."""

    def parse_known_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)  # this parser's part (a command's own options)
        return super().parse_known_args(args, namespace)

    def unknown_options(self) -> list[str]:
        """The given options this parser does not know (``--name=value`` by its name; a unique abbreviation of a
        known ``--option`` counts as known, as argparse takes it), up to a ``--``."""
        known = self._option_string_actions  # argparse's table of this parser's option strings
        unknown = []
        for token in getattr(self, "given", []):
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if not token.startswith("-") or token == "-" or _NUMBER.match(token) or name in known:
                continue
            if not (self.allow_abbrev and name.startswith("--") and any(o.startswith(name) for o in known)):
                unknown.append(name)
        return unknown

    def error(self, message: str):
        unknown = self.unknown_options() if message.startswith(_REQUIRED) else []
        if unknown:  # `cptune --frobnicate`: the mistake is the option, not the missing command
            message = f"unrecognized arguments: {' '.join(unknown)}"
        self.exit(EXIT_USAGE, f"cptune: error: {message} (see `{self.prog} --help`)\n")


# -- argument types: a bad number is refused while parsing, named by its flag, before anything loads ---

def _number(kind, accepts, check):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepts}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text} is not {accepts}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
non_negative_float = _number(float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
fraction = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)

DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps"
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")  # cptune.models' dtypes (a test keeps them equal)


def device_name(text: str) -> str:
    """``--device``: refused while parsing when it is no device name at all (one torch cannot have); whether this
    machine has it is checked when the model loads."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; accepted: {DEVICE_NAMES}")
    return text


def method_name(text: str) -> str:
    """``--methods``: one of cptune's methods, refused while parsing (before torch) otherwise."""
    if text not in (*METHOD_NAMES, *ENCODER_METHOD_NAMES):
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; accepted: "
                                         f"{', '.join((*METHOD_NAMES, *ENCODER_METHOD_NAMES))}")
    return text


def dtype_name(text: str) -> str:
    """``--dtype``: ``auto`` or one of :data:`DTYPE_NAMES` (``torch.`` in front allowed, as cptune.models takes it)."""
    if text.strip().lower().removeprefix("torch.") not in ("auto", *DTYPE_NAMES):
        raise argparse.ArgumentTypeError(f"unsupported dtype {text!r}; accepted: auto, {', '.join(DTYPE_NAMES)}")
    return text


def add_ray_arg(p, what: str) -> None:
    """``--ray [ADDRESS]``: run on a Ray cluster (the ray extra); the address is optional."""
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help=f"{what} on a Ray cluster: ADDRESS (host:port, ray://host:port, auto), else the one "
                        "RAY_ADDRESS names, else a local cluster on this machine (needs pip install 'cptune[ray]'; "
                        "docs/scaling.md)")


def add_overwrite_arg(p, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing --output ({what}); without it an existing one is refused")


# -- options shared by several commands --------------------------------------------------------

def add_model_args(p, model_default: str | None = DEFAULT_MODEL) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--device-map``: where and how the base model runs."""
    if model_default is None:
        p.add_argument("--model", default=None, help="base model (default: the one the classifier was trained on)")
    else:
        p.add_argument("--model", default=model_default,
                       help="embedded default name, local folder, .gguf file or hub id (default: %(default)s)")
    p.add_argument("--device", default="auto", type=device_name,
                   help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--dtype", default="auto", type=dtype_name,
                   help="auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16, float16 or "
                        "float64 (default: %(default)s); the context and its corrections stay float32")
    p.add_argument("--device-map", default=None,
                   help="spread the model over devices through accelerate, e.g. auto (default: none; "
                        "exclusive with --device)")


def add_data_args(p, required: bool, split_default: str, aliases: tuple[str, ...] = ()) -> None:
    """``--data`` and how to read it: split, config, columns."""
    p.add_argument("--data", *aliases, required=required, default=None,
                   help="a built-in name (`cptune datasets`), a CSV/TSV/JSONL/Parquet file, a folder saved by "
                        "datasets' save_to_disk, or a hub dataset id" + ("" if required else " (required)"))
    p.add_argument("--split", default=None,
                   help=f"split of a source that has splits (default: {split_default})")
    p.add_argument("--config", default=None, help="configuration of a hub dataset (its second name)")
    p.add_argument("--text-column", default=None, help="text column (default: text)")
    p.add_argument("--label-column", default=None, help="label column (default: label)")


def add_calibrate_arg(p) -> None:
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="contextual calibration of the label probabilities (Zhao et al. 2021); "
                        "default: as the classifier was saved")


def add_classifier_args(p) -> None:
    p.add_argument("classifier", help="folder written by `cptune train`, `cptune demo` (OUTPUT/classifier) or "
                                      "CPTClassifier.save; or a CPT adapter folder with --template and --label-words")
    add_model_args(p, model_default=None)
    p.add_argument("--template", default=None,
                   help="for an adapter folder without cptune_classifier.json: its context's template")
    p.add_argument("--label-words", default=None,
                   help="for an adapter folder without cptune_classifier.json: label=word,label=word")
    p.add_argument("--batch-size", type=positive_int, default=8, help="texts per forward (default: %(default)s)")
    add_calibrate_arg(p)


# -- the commands ------------------------------------------------------------------------------

_DEMO_HELP = {
    "model": "embedded default name, local folder, .gguf file or hub id",
    "device": "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps",
    "dtype": "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16, float16, float64",
    "device_map": "spread the model over devices through accelerate, e.g. auto",
    "dataset": "built-in dataset",
    "template": "auto (chosen from the shots alone, used by every method) or a format with {x} and {y}",
    "shots": "demonstrations in the context (balanced across classes)",
    "test_size": "balanced test examples, disjoint from the shots",
    "seed": "seed of the split and of training",
    "steps": "CPT optimizer steps",
    "batch_size": "queries per step",
    "lr": "AdamW learning rate",
    "eps_input": "projection epsilon of input-text tokens",
    "eps_format": "projection epsilon of template tokens",
    "decay": "loss decay factor gamma in (0, 1]",
    "radius": "absolute (eps * sqrt(d/2048), as PEFT) or relative (that times the model's embedding scale over "
              "SmolLM2-135M's)",
    "output": f"folder for {CLASSIFIER_SUBDIR}/ and results.json",
}


DEMO_COUNTS = ("shots", "test_size")  # demo options that count something: refused below 1 by their flag's name


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="zero-shot vs ICL vs CPT on a built-in dataset (the main job)",
                       description=DemoSettings.__doc__)
    for f in fields(DemoSettings):  # the declared defaults: building DemoSettings() would check (and import) more
        default = f.default
        names = ["--data", "--dataset"] if f.name == "dataset" else [f"--{f.name.replace('_', '-')}"]
        kind = positive_int if f.name in DEMO_COUNTS else str if default is None else type(default)  # --data as
        p.add_argument(*names, dest=f.name, type=kind,  # on every command
                       default=default, help=f"{_DEMO_HELP[f.name]} (default: %(default)s)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a CPT classifier on labelled data and save it",
                       description="Train on the labelled rows of --data: --context-size of them (balanced, "
                                   "seeded) form the context, and every row is a training query.")
    add_data_args(p, required=True, split_default="train")
    p.add_argument("--shots", "--train-size", dest="shots", type=positive_int, default=None,
                   help="use only N labelled rows, balanced over the classes and seeded (default: every row)")
    p.add_argument("--context-size", type=positive_int, default=None,
                   help="demonstrations in the context, balanced and seeded (default: every training row; "
                        "an error says when they do not fit the model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and of training (default: %(default)s)")
    add_model_args(p)
    p.add_argument("--template", default="auto",
                   help="auto: chosen with the label words' case from the labelled rows alone, the choice and its "
                        "scores saved (default); or a format with {x} and {y}, \\n for newline")
    p.add_argument("--selection-budget", type=non_negative_int, default=400,
                   help="forward passes --template auto may spend choosing (default: %(default)s)")
    p.add_argument("--label-words", default=None, help="label=word,label=word (default: the dataset's, else each "
                                                       "label written as itself if it is a word: 0/1 or LABEL_0 "
                                                       "are refused)")
    p.add_argument("--steps", type=positive_int, default=40, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="queries per step (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--eps-input", type=non_negative_float, default=0.2,
                   help="epsilon of input tokens (default: %(default)s)")
    p.add_argument("--eps-format", type=non_negative_float, default=0.1,
                   help="epsilon of template tokens (default: %(default)s)")
    p.add_argument("--decay", type=fraction, default=0.95, help="loss decay gamma in (0, 1] (default: %(default)s)")
    p.add_argument("--radius", choices=RADIUS_CHOICES, default=RADIUS_CHOICES[0],
                   help="absolute: radius eps * sqrt(d/2048), as PEFT; relative: that times the model's embedding "
                        "scale over SmolLM2-135M's (the same there, larger where embeddings are larger, as Gemma's) "
                        "(default: %(default)s)")
    p.add_argument("--choose-steps", action=argparse.BooleanOptionalAction, default=False,
                   help="with --context-size leaving 8 or more rows outside the context, train as many of the "
                        "--steps as two-fold cross-validation on those rows finds best (0, a quarter, ..., all; "
                        "about 2x the training time; default: off)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="checkpoint every N steps (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT/checkpoint")
    p.add_argument("--calibrate", action="store_true",
                   help="save the classifier with contextual calibration on (Zhao et al. 2021; default: off)")
    p.add_argument("--unlabeled", default=None, metavar="FILE",
                   help="a text file, one text per line (e.g. the texts to label), that the balance check after "
                        "training also scores: a label given to nearly every text has its bias removed "
                        "(never trained on; default: labelled rows and content-free inputs only)")
    p.add_argument("--output", required=True, help="folder to write the classifier (a PEFT-loadable adapter)")
    p.add_argument("--keep-training-data", action="store_true",
                   help="save every training row (text and label) in the classifier, to reproduce the run "
                        "(default: only the context's examples, and salted hashes of the other texts for eval)")
    add_overwrite_arg(p, "a classifier saved there before, or a folder holding other files: cptune's files "
                         "are written there, the others stay")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, macro-F1, per-class precision and recall, confusion matrix of a "
                                    "saved classifier on every row of a test set",
                       description="Score every row of --data (imbalanced allowed); rows whose text the "
                                   "classifier was trained on are reported and left out.")
    add_classifier_args(p)
    add_data_args(p, required=False, split_default="test", aliases=("--test-data",))  # checked after the folder
    p.add_argument("--test-size", type=positive_int, default=None,
                   help="score a seeded random sample of N rows instead of all (default: all rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of --test-size's sample (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of tables")
    p.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    add_overwrite_arg(p, "a file")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="labels and probabilities: JSON lines for texts from arguments, a text file "
                                       "or standard input; or a CSV/TSV/JSONL/Parquet file annotated into --output")
    add_classifier_args(p)
    p.add_argument("texts", nargs="*", help="texts to classify (default: read --file or standard input)")
    p.add_argument("--file", default=None,
                   help="a text file (one text per line), or a .csv/.tsv/.jsonl/.parquet file to annotate")
    p.add_argument("--text-column", default="text", help="text column of a data file (default: %(default)s)")
    p.add_argument("--output", default=None,
                   help="annotated copy of a data --file: its rows plus predicted_label and p_<label> columns "
                        "(.csv, .tsv, .jsonl or .parquet)")
    p.add_argument("--prefix", default="",
                   help="put before the added columns' names, when the --file already has such a column "
                        "(e.g. cptune_ gives cptune_predicted_label)")
    add_overwrite_arg(p, "a file")
    add_ray_arg(p, "annotate the data --file (or a folder of such files) with one actor per worker")
    p.add_argument("--ray-workers", type=positive_int, default=None,
                   help="with --ray: actors, each loading the classifier once (default: the cluster's CPUs over "
                        "--ray-threads)")
    p.add_argument("--ray-threads", type=positive_int, default=1,
                   help="with --ray: torch threads and CPUs per actor (default: %(default)s)")
    p.add_argument("--ray-gpus", type=non_negative_float, default=0,
                   help="with --ray: GPUs per actor, a fraction shares one (default: %(default)s)")


def _add_datasets(sub) -> None:
    sub.add_parser("datasets", help="list the built-in datasets (offline stand-ins) and hub names")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="a grid of (dataset, shots, seed, method) cells: one JSON line each, "
                                       "resumable; a Markdown table and plots")
    p.add_argument("--data", "--dataset", dest="data", nargs="+", default=["rotten_tomatoes"],
                   help="built-in datasets, files or hub ids (default: %(default)s)")
    p.add_argument("--shots", nargs="+", type=positive_int, default=[2, 4, 8],
                   help="demonstrations in the context (default: %(default)s)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="train every method on N labelled examples, the context's shots among them "
                        "(default: the shots alone, the paper's true few-shot setting)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds (default: %(default)s)")
    p.add_argument("--methods", nargs="+", type=method_name, default=list(METHOD_NAMES),
                   help="methods (default: the six causal-LM methods; also setfit and embedding-lr, the sentence-"
                        "encoder baselines of the setfit extra)")
    add_model_args(p)
    p.add_argument("--test-size", type=positive_int, default=200, help="balanced test examples (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps of trained methods (default: 40)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a method setting, e.g. cpt_lr=1e-4 or decay=1 (repeatable; names: cptune.MethodSettings)")
    p.add_argument("--template", default=None, help="{x} and {y} format, \\n for newline; or auto: chosen per cell "
                                                    "from its labelled examples (default: each dataset's)")
    p.add_argument("--label-words", default=None, help="label=word,label=word (default: each dataset's)")
    p.add_argument("--only", default=None, help="run only matching cells, e.g. dataset=subj,shots=4,seed=0,method=cpt")
    p.add_argument("--report-only", action="store_true", help="do not run cells; rebuild the table and plots")
    add_ray_arg(p, "run each cell as a task")
    p.add_argument("--ray-cpus-per-cell", type=positive_float, default=1,
                   help="with --ray: CPUs (and torch threads) per cell (default: %(default)s)")
    p.add_argument("--ray-gpus-per-cell", type=non_negative_float, default=0,
                   help="with --ray: GPUs per cell, a fraction shares one (default: %(default)s)")
    p.add_argument("--versus", default=None, metavar="DIR",
                   help="another grid's output folder: the report adds each method minus the same method there, "
                        "on the cells both have (e.g. --template auto against the fixed templates)")
    p.add_argument("--output", required=True, help="folder for results.jsonl, results.md, accuracy.png, gap.png")


def _add_download(sub) -> None:
    from cptune.app import download

    download.add_parser(sub)


def _add_serve(sub) -> None:
    from cptune.app import serve

    p = serve.add_parser(sub)  # the folder and the server's options; the model's options as for predict:
    add_model_args(p, model_default=None)
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward (default: %(default)s)")
    add_calibrate_arg(p)


# command -> (adds its parser, the module that runs it: run_<command> in cptune.app.commands, else run)
COMMANDS = {
    "demo": (_add_demo, "cptune.app.commands"),
    "train": (_add_train, "cptune.app.commands"),
    "eval": (_add_eval, "cptune.app.commands"),
    "predict": (_add_predict, "cptune.app.commands"),
    "datasets": (_add_datasets, "cptune.app.commands"),
    "compare": (_add_compare, "cptune.app.commands"),
    "download": (_add_download, "cptune.app.download"),
    "serve": (_add_serve, "cptune.app.commands"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``cptune`` argument parser."""
    parser = OneLineParser(prog="cptune", description="Context-aware Prompt Tuning for few-shot classification")
    parser.add_argument("--version", action="version", version=f"cptune {__version__}")
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    for command in sub.choices.values():  # `cptune train ... --debug` as well as `cptune --debug train ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _handler(command: str):
    name = COMMANDS[command][1]
    return getattr(importlib.import_module(name), f"run_{command}" if name == "cptune.app.commands" else "run")


def _plain_message(err: BaseException) -> bool:
    """Whether a run-time failure's message says it all (no exception class name needed)."""
    training = sys.modules.get("cptune.training")  # imported only if training ran
    return isinstance(err, OSError) or (training is not None and isinstance(err, training.NonFiniteLossError))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cptune`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, a usage mistake: argparse has printed its line
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    reporting.install(handler=True)  # notices and warnings as `cptune: ...` lines on standard error
    try:
        return _handler(args.command)(args)
    except KeyboardInterrupt:
        print("cptune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (and a status) for the user
        if debug:
            traceback.print_exc()
        status = exit_status(err)
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if status == EXIT_RUNTIME and not _plain_message(err):
            text = f"{type(err).__name__}: {text}" if text else type(err).__name__
        hint = "" if debug or status == EXIT_USAGE else " (run with --debug for the traceback)"
        print(f"cptune: error: {text or type(err).__name__}{hint}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
