"""Experiment grids: every (dataset, shots, seed, method) cell, one JSON line each, resumable.

Each cell is independent: its test set depends only on (dataset, seed, test size) and its shots on
(dataset, seed, shots), so a cell gives the same result whether it runs inside a grid, alone
(``--only``), or on another machine; the report step merges the lines.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cptune import reporting
from cptune.cpt.saving import prepare_folder, write_file_atomic
from cptune.data import DATASET_DEFAULTS, Dataset, load_dataset, sample_splits
from cptune.methods import ALL_METHODS, ENCODER_METHODS, MethodSettings, make_method, settings_read
from cptune.methods.encoder import ENCODER_PACKAGE
from cptune.models import DEFAULT_MODEL, load_model
from cptune.recipe import context_examples
from cptune.scoring import CONTENT_FREE_TEXTS, classification_metrics, contextual_calibration
from cptune.selection import AUTO as AUTO_TEMPLATE
from cptune.selection import choose_template
from cptune.text.template import Template, words_needed_error

RESULTS_NAME = "results.jsonl"
CELL_KEYS = ("dataset", "shots", "seed", "method")


@dataclass(frozen=True)
class Cell:
    """One experiment: a method on a dataset with ``shots`` demonstrations and a seed."""

    dataset: str
    shots: int
    seed: int
    method: str

    def key(self) -> tuple:
        return (self.dataset, self.shots, self.seed, self.method)


def make_grid(datasets: Sequence[str], shots: Sequence[int], seeds: Sequence[int], methods: Sequence[str],
              only: str | None = None) -> list[Cell]:
    """All cells, optionally filtered by ``only`` (``"dataset=subj,shots=4,seed=0,method=cpt"``, any subset).

    Raises:
        ValueError: unknown method, empty axis, or a malformed ``only``.
    """
    for name, axis in (("datasets", datasets), ("shots", shots), ("seeds", seeds), ("methods", methods)):
        if not axis:
            raise ValueError(f"{name} is empty; give at least one")
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; accepted: {', '.join(ALL_METHODS)}")
    bad_shots = [k for k in shots if k < 1]
    if bad_shots:
        raise ValueError(f"shots={bad_shots[0]} must be >= 1")
    cells = [Cell(d, k, s, m) for d in datasets for k in shots for s in seeds for m in methods]
    if only:
        wanted = _parse_only(only)
        cells = [c for c in cells if all(str(getattr(c, k)) == v for k, v in wanted.items())]
        if not cells:
            raise ValueError(f"--only {only!r} selects no cell of the grid")
    return cells


def _parse_only(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in CELL_KEYS:
            raise ValueError(f"--only item {item!r} is not key=value with key in {', '.join(CELL_KEYS)}")
        out[key.strip()] = value.strip()
    return out


# -- the results file ------------------------------------------------------------------------

def read_results(path: Path) -> tuple[list[dict], int]:
    """Rows of a results JSONL file and the number of damaged lines skipped.

    A line that is not complete JSON (e.g. half-written when a run was killed) is skipped, never
    parsed as data; :func:`append_result` removes such a tail before it appends.
    """
    if not path.is_file():
        return [], 0
    rows, damaged = [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        complete = i < len(lines) - 1  # a last line without newline was cut short
        try:
            row = json.loads(line.decode("utf-8")) if complete else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict) or any(k not in row for k in CELL_KEYS):
            damaged += 1
            continue
        rows.append(row)
    return rows, damaged


def append_result(path: Path, row: dict) -> None:
    """Append one JSON line durably; first drops a half-written last line left by a killed run."""
    prepare_folder(path.parent)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            write_file_atomic(path, data[: data.rfind(b"\n") + 1])
    line = json.dumps(row, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# -- running cells ---------------------------------------------------------------------------

def cell_splits(dataset: Dataset, cell: Cell, test_size: int, train_size: int | None = None):
    """Test set from (dataset, seed) only; shots from the rest with (seed, shots).

    With ``train_size`` N, N labelled examples are drawn from the rest with (seed, N) and the cell's
    shots from them (:func:`cptune.recipe.context_examples`); otherwise the shots are the only
    labelled data. Returns ``(shots, training queries, test)``.
    """
    _, _, test = sample_splits(dataset, 0, test_size, cell.seed)
    held_out = {ex.text for ex in test}
    rest = Dataset(dataset.name, [ex for ex in dataset.examples if ex.text not in held_out], dataset.labels,
                   dataset.provenance)
    if train_size is None:
        shots, _, _ = sample_splits(rest, cell.shots, 0, cell.seed)
        return shots, shots, test
    if train_size < cell.shots:
        raise ValueError(f"train_size={train_size} is less than the cell's {cell.shots} shots; the shots are "
                         "drawn from the training examples")
    labelled, _, _ = sample_splits(rest, train_size, 0, cell.seed)
    return context_examples(labelled, cell.shots, cell.seed), labelled, test


def cell_format(dataset: Dataset, template: str | None = None,
                label_words: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The template and label words a cell uses: the given ones (matched to the dataset's labels by
    their text, so ``{"0": "negative"}`` names the int label 0), else the dataset's defaults, else each
    label written as itself if every label is a word (:func:`cptune.text.template.label_word_problem`).

    Raises:
        ValueError: if ``label_words`` misses a label of the dataset, or no words are given or known for
            labels that are not words (the message says how to give them).
    """
    fmt, words = DATASET_DEFAULTS.get(dataset.name, ("input: {x} output: {y}", None))
    if label_words is None and words is None:
        error = words_needed_error(dataset.labels, "--label-words")
        if error is not None:
            raise error
    words = dict(label_words) if label_words is not None else (
        dict(words) if words is not None else {label: str(label) for label in dataset.labels})
    words = {label: words.get(label, words.get(str(label))) for label in dataset.labels
             if label in words or str(label) in words}
    missing = [label for label in dataset.labels if label not in words]
    if missing:
        raise ValueError(f"label {missing[0]!r} of dataset {dataset.name!r} has no label word; "
                         f"its labels: {', '.join(map(str, dataset.labels))}")
    return (template if template is not None else fmt), {label: words[label] for label in dataset.labels}


def run_cell(cell: Cell, dataset: Dataset, base_model, tokenizer, model_name: str, test_size: int,
             settings: MethodSettings, template: str | None = None, label_words: dict[str, str] | None = None,
             train_size: int | None = None, choices: dict | None = None) -> dict:
    """Fit and evaluate one cell; returns its result row (``template``/``label_words``: see :func:`cell_format`;
    ``train_size``: see :func:`cell_splits`; ``choices``: a dict that keeps ``template="auto"``'s choice per
    dataset, shots and seed, so the methods of one split share it instead of choosing again)."""
    fmt, words = cell_format(dataset, template, label_words)
    shots, train_queries, test = cell_splits(dataset, cell, test_size, train_size)
    choice, used_words = None, words
    if fmt == AUTO_TEMPLATE and cell.method not in ENCODER_METHODS:  # from the cell's labelled data alone; the
        # encoder methods do not read a template, so they skip the choice
        key = (cell.dataset, cell.shots, cell.seed)
        choice = (choices or {}).get(key)
        if choice is None:
            choice = choose_template(base_model, tokenizer, [(ex.text, ex.label) for ex in train_queries], words,
                                     seed=cell.seed)
            if choices is not None:
                choices[key] = choice
        template, used_words = choice.template, choice.label_words
    else:
        template = Template(fmt if fmt != AUTO_TEMPLATE else "input: {x} output: {y}")
    method = make_method(cell.method, base_model, tokenizer, template, used_words, settings.replace(seed=cell.seed))
    fit = method.fit(shots, train_queries)
    start = time.perf_counter()
    scores = method.scores([ex.text for ex in test] + list(CONTENT_FREE_TEXTS))
    score_seconds = time.perf_counter() - start
    scores, content_free = scores[: len(test)], scores[len(test) :]
    calibrated = contextual_calibration(scores, content_free)
    labels = list(words)
    gold = [labels.index(ex.label) for ex in test]
    metrics = classification_metrics(scores.argmax(-1).tolist(), gold, len(labels))
    return {
        **asdict(cell),
        **metrics,
        "calibrated": classification_metrics(calibrated.argmax(-1).tolist(), gold, len(labels)),
        "content_free_probs": torch.softmax(content_free.float(), dim=-1).mean(0).tolist(),
        "labels": labels,
        "test_size": len(test),
        "train_size": train_size,
        "train_loss": method.label_loss([ex.text for ex in train_queries], [ex.label for ex in train_queries]),
        "test_loss": method.label_loss([ex.text for ex in test], [ex.label for ex in test], scores=scores),
        "fit_seconds": round(fit.seconds, 2),
        "score_seconds": round(score_seconds, 2),
        "trainable_parameters": fit.trainable_parameters,
        "final_train_step_loss": fit.losses[-1] if fit.losses else None,
        "model": model_name,  # the causal LM loaded for the grid, also for the encoder methods, which ignore it
        "encoder": ENCODER_PACKAGE if cell.method in ENCODER_METHODS else None,  # what those use instead
        "template": fmt,
        "label_words": words,
        "template_choice": choice.to_json() if choice is not None else None,
        "settings": asdict(settings.replace(seed=cell.seed)),
        "data": dataset.provenance,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }


def _run_config(row: dict, method: str) -> dict:
    """What, besides the cell, decides a row's result (compared when a grid resumes): the settings
    compared are those ``method`` reads, so changing CPT's learning rate leaves the other methods'
    cells resumable."""
    read = settings_read(method) if method in ALL_METHODS else ()
    # A setting a row lacks did not exist when it ran (e.g. radius): it ran with that setting's default.
    settings = {k: v for k, v in {**asdict(MethodSettings()), **row.get("settings", {})}.items() if k in read}
    words = row.get("label_words")  # JSON keys are text: 0 and "0" are the same label here
    words = {str(k): v for k, v in words.items()} if isinstance(words, dict) else words
    return {"model": row.get("model"), "test_size": row.get("test_size"), "template": row.get("template"),
            "label_words": words, "train_size": row.get("train_size"), "settings": settings}


def _check_same_config(rows: list[dict], expected: dict[str, dict], methods: set[str], path: Path) -> None:
    """Refuse to add cells beside rows of the same datasets and methods that were run differently."""
    for r in rows:
        if r["dataset"] not in expected or r["method"] not in methods:
            continue
        want, have = _run_config(expected[r["dataset"]], r["method"]), _run_config(r, r["method"])
        diff = [k for k in want if have[k] != want[k]]
        if diff:
            key = diff[0]
            if key == "settings":
                names = sorted(set(have["settings"]) | set(want["settings"]))
                key = next(k for k in names if have["settings"].get(k) != want["settings"].get(k))
                there, now = have["settings"].get(key), want["settings"].get(key)
            else:
                there, now = have[key], want[key]
            raise ValueError(f"{path} holds {r['method']} cells run with {key}={there!r}, this run has "
                             f"{key}={now!r}; use another --output (cells are only resumed under the same "
                             "settings)")


@dataclass
class GridPlan:
    """What a grid run has left to do: the rows already in ``path``, the cells not yet there, their datasets."""

    path: Path  # output/results.jsonl
    rows: list[dict]
    todo: list[Cell]
    datasets: dict[str, Dataset]


def plan_grid(cells: Iterable[Cell], output: Path, model: str = DEFAULT_MODEL, test_size: int = 200,
              settings: MethodSettings | None = None, progress: bool = True, template: str | None = None,
              label_words: dict[str, str] | None = None, train_size: int | None = None) -> GridPlan:
    """Read ``output/results.jsonl``, check that its rows were run like this grid, and list the cells left.

    The one resume rule of a grid, whichever way it runs (:func:`run_grid` here, or
    :func:`cptune.app.onray.run_grid_ray` on a Ray cluster). Arguments as for :func:`run_grid`.

    Raises:
        ValueError: as :func:`run_grid`.
    """
    settings = settings or MethodSettings()
    path = Path(output) / RESULTS_NAME
    rows, damaged = read_results(path)
    if damaged and progress:
        print(f"skipping {damaged} damaged line(s) in {path} (an interrupted run); their cells will rerun")
    cells = list(cells)
    datasets = {name: load_dataset(name, default_split="train") for name in dict.fromkeys(c.dataset for c in cells)}
    expected = {}
    for name, dataset in datasets.items():
        fmt, words = cell_format(dataset, template, label_words)
        expected[name] = {"model": model, "test_size": test_size, "template": fmt, "label_words": words,
                          "train_size": train_size, "settings": asdict(settings)}
    _check_same_config(rows, expected, {c.method for c in cells}, path)
    done = {tuple(r[k] for k in CELL_KEYS) for r in rows}
    return GridPlan(path, rows, [c for c in cells if c.key() not in done], datasets)


def run_grid(cells: Iterable[Cell], output: Path, model: str = DEFAULT_MODEL, test_size: int = 200,
             settings: MethodSettings | None = None, progress: bool = True, template: str | None = None,
             label_words: dict[str, str] | None = None, train_size: int | None = None,
             model_options: dict | None = None) -> list[dict]:
    """Run every cell not yet in ``output/results.jsonl``; append one line per finished cell.

    ``template`` and ``label_words`` replace the datasets' defaults (see :func:`cell_format`);
    ``train_size`` N trains every method on N labelled examples, the cell's shots among them (see
    :func:`cell_splits`); ``model_options`` (``device``, ``dtype``, ``device_map``) go to
    :func:`cptune.models.load_model`. A dataset with splits (a hub id, a saved DatasetDict) is read
    from its ``train`` split, test examples included.

    Returns:
        All rows in the file afterwards (earlier ones included).

    Raises:
        ValueError: if the file holds cells of the same datasets and methods run with another
            template, label words, model, test size or train size, or with other values of the settings
            that method reads (:func:`cptune.methods.settings_read`): resuming would mix them.
    """
    settings = settings or MethodSettings()
    plan = plan_grid(cells, output, model, test_size, settings, progress, template, label_words, train_size)
    rows = plan.rows
    base_model, tokenizer = load_model(model, **(model_options or {})) if plan.todo else (None, None)
    choices: dict = {}
    with reporting.progress(len(plan.todo), "compare", unit="cell", enabled=progress) as bar:  # the only bar drawn
        for cell in plan.todo:
            bar.set_postfix_str(cell_name(cell))
            row = run_cell(cell, plan.datasets[cell.dataset], base_model, tokenizer, model, test_size, settings,
                           template, label_words, train_size, choices)
            append_result(plan.path, row)
            rows.append(row)
            bar.update(1)
    return rows


def cell_name(cell: Cell) -> str:
    """A cell in a few words, for progress bars and messages: ``rotten_tomatoes k=4 seed=0 cpt``."""
    return f"{cell.dataset} k={cell.shots} seed={cell.seed} {cell.method}"
