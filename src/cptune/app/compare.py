"""Experiment grids: every (dataset, shots, seed, method) cell, one JSON line each, resumable.

Each cell is independent: its test set depends only on (dataset, seed, test size) and its shots on
(dataset, seed, shots), so a cell gives the same result whether it runs inside a grid, alone
(``--only``), or on another machine; the report step merges the lines.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cptune.cpt.saving import prepare_folder, write_file_atomic, write_text_atomic
from cptune.data import DATASET_DEFAULTS, Dataset, load_dataset, sample_splits
from cptune.methods import ALL_METHODS, ENCODER_METHODS, METHODS, MethodSettings, make_method, settings_read
from cptune.models import DEFAULT_MODEL, load_model
from cptune.recipe import context_examples
from cptune.scoring import CONTENT_FREE_TEXTS, classification_metrics, contextual_calibration
from cptune.selection import AUTO as AUTO_TEMPLATE
from cptune.selection import choose_template
from cptune.text.template import Template

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
    """The template and label words a cell uses: the given ones, else the dataset's defaults.

    Raises:
        ValueError: if ``label_words`` misses a label of the dataset.
    """
    fmt, words = DATASET_DEFAULTS.get(dataset.name, ("input: {x} output: {y}", None))
    words = dict(label_words) if label_words is not None else (
        dict(words) if words is not None else {label: str(label) for label in dataset.labels})
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
        "model": model_name,
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
    settings = {k: v for k, v in row.get("settings", {}).items() if k in read}
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
    output = Path(output)
    path = output / RESULTS_NAME
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
    todo = [c for c in cells if c.key() not in done]
    base_model, tokenizer = load_model(model, **(model_options or {})) if todo else (None, None)
    bar = tqdm(todo, desc="compare", disable=not progress)
    choices: dict = {}
    for cell in bar:
        bar.set_postfix_str(f"{cell.dataset} k={cell.shots} seed={cell.seed} {cell.method}")
        row = run_cell(cell, datasets[cell.dataset], base_model, tokenizer, model, test_size, settings,
                       template, label_words, train_size, choices)
        append_result(path, row)
        rows.append(row)
    return rows


# -- the report ------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _metric(row: dict, metric: str) -> float | None:
    """``accuracy``/``macro_f1`` of a row, or ``calibrated_accuracy``/``calibrated_macro_f1`` (None if absent)."""
    if metric.startswith("calibrated_"):
        return row.get("calibrated", {}).get(metric.removeprefix("calibrated_"))
    return row.get(metric)


def summary_table(rows: list[dict], metric: str = "accuracy") -> str:
    """Markdown: ``metric`` mean +- std over seeds, one row per (dataset, method), one column per shot count.

    ``metric``: ``accuracy``, ``macro_f1``, ``calibrated_accuracy``, ``calibrated_macro_f1`` or any other
    numeric field of the rows (e.g. ``fit_seconds``).
    """
    groups: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        value = _metric(r, metric)
        if value is not None:
            groups[(r["dataset"], r["method"])][r["shots"]].append(value)
    shots = sorted({r["shots"] for r in rows})
    lines = ["| dataset | method | " + " | ".join(f"{k} shots" for k in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    for (dataset, method), by_shots in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        cells = []
        for k in shots:
            if by_shots.get(k):
                mean, std = _mean_std(by_shots[k])
                cells.append(f"{mean:.3f} ± {std:.3f} (n={len(by_shots[k])})")
            else:
                cells.append("–")
        lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


BOOTSTRAP_RESAMPLES = 10_000
"""Resamples of the percentile bootstrap behind every paired interval (seeded, so reports are reproducible)."""


def bootstrap_interval(diffs: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences.

    The cells are resampled with replacement ``resamples`` times; the interval runs between the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means. It describes the
    spread over these cells (seeds, datasets, shot counts), not the test-set sampling inside each cell.

    Raises:
        ValueError: no differences, or a level outside (0, 1).
    """
    if not diffs:
        raise ValueError("bootstrap_interval needs at least one difference")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    values = np.asarray(diffs, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)  # (resamples,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_table(rows: list[dict], reference: str = "cpt", metric: str = "accuracy",
                 by: Sequence[str] = ()) -> str:
    """Markdown: ``reference`` minus each other method on the same (dataset, shots, seed) cells.

    Columns: the group (one row per value of the ``by`` keys, e.g. ``("dataset", "shots")``; all
    cells together when empty), the method, cells compared, mean difference with its bootstrap 95%
    interval (:func:`bootstrap_interval`), and wins / ties / losses of ``reference``.
    """
    by_key = {(r["dataset"], r["shots"], r["seed"], r["method"]): _metric(r, metric) for r in rows}
    group_of = {name: i for i, name in enumerate(CELL_KEYS)}
    head = "".join(f"| {name} " for name in by)
    lines = [f"{head}| {reference} vs | cells | mean difference | 95% interval | {reference} wins / ties / losses |",
             "|---" * (len(by) + 5) + "|"]
    groups = sorted({tuple(key[group_of[name]] for name in by) for key in by_key}, key=str)
    for group in groups:
        for other in ALL_METHODS:
            if other == reference:
                continue
            diffs = [v - by_key[(d, k, s, other)] for (d, k, s, m), v in by_key.items()
                     if m == reference and v is not None and by_key.get((d, k, s, other)) is not None
                     and tuple((d, k, s, m)[group_of[name]] for name in by) == group]
            if diffs:
                lines.append("".join(f"| {value} " for value in group) + _difference_row(other, diffs))
    return "\n".join(lines)


def _difference_row(name: str, diffs: list[float]) -> str:
    """``| name | cells | mean difference | 95% interval | above / equal / below zero |`` for paired differences."""
    above, below = sum(x > 1e-12 for x in diffs), sum(x < -1e-12 for x in diffs)
    low, high = bootstrap_interval(diffs)
    return (f"| {name} | {len(diffs)} | {statistics.fmean(diffs):+.3f} | [{low:+.3f}, {high:+.3f}] | "
            f"{above} / {len(diffs) - above - below} / {below} |")


def calibration_table(rows: list[dict]) -> str:
    """Markdown: per method, calibrated minus raw accuracy over the cells that have both."""
    lines = ["| method | cells | mean (calibrated - raw) | 95% interval | calibration helps / same / hurts |",
             "|---|---|---|---|---|"]
    for method in ALL_METHODS:
        diffs = [r["calibrated"]["accuracy"] - r["accuracy"] for r in rows
                 if r["method"] == method and _metric(r, "calibrated_accuracy") is not None]
        if diffs:
            lines.append(_difference_row(method, diffs))
    return "\n".join(lines)


LOSS_KINDS = (
    (METHODS, "label NLL", "Train vs test loss (label NLL; the generalisation gap)"),
    (ENCODER_METHODS, "cross-entropy over the labels",
     "Train vs test loss of the encoder methods (their head's cross-entropy over the labels, a "
     "probability among the C labels: not comparable with the causal-LM methods' label NLL)"),
)
"""Methods whose losses share a scale, the loss's name, and the report's heading for them."""


def loss_table(rows: list[dict], methods: Sequence[str] = METHODS) -> str:
    """Markdown: mean train loss (on the training examples), test loss and their gap, per method of ``methods``.

    ``methods`` should share a loss scale (:data:`LOSS_KINDS`): the causal-LM methods' label NLL is
    not comparable with the encoder methods' cross-entropy over the labels.
    """
    lines = ["| method | cells | train loss | test loss | gap (test - train) |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r["method"] == method and _finite(r.get("train_loss"), r.get("test_loss"))]
        if mine:
            train = statistics.fmean(r["train_loss"] for r in mine)
            test = statistics.fmean(r["test_loss"] for r in mine)
            lines.append(f"| {method} | {len(mine)} | {train:.3f} | {test:.3f} | {test - train:+.3f} |")
    return "\n".join(lines)


def report_markdown(rows: list[dict]) -> str:
    """The ``results.md`` of a grid: accuracy tables (raw and calibrated), paired differences, losses."""
    parts = ["## Accuracy (mean ± std over seeds)", "", summary_table(rows, "accuracy"), ""]
    if any("calibrated" in r for r in rows):
        parts += ["## Accuracy with contextual calibration (Zhao et al. 2021)", "",
                  summary_table(rows, "calibrated_accuracy"), ""]
        parts += ["## What contextual calibration changes (accuracy, same cells)", "", calibration_table(rows), ""]
    parts += ["## Macro-F1", "", summary_table(rows, "macro_f1"), ""]
    if any(r["method"] == "cpt" for r in rows):
        parts += ["## CPT against each method, same cells (accuracy; bootstrap 95% interval over the cells)", "",
                  paired_table(rows), "", "### By dataset and shots", "",
                  paired_table(rows, by=("dataset", "shots")), ""]
    for methods, _, heading in LOSS_KINDS:
        if any(r["method"] in methods for r in rows):
            parts += [f"## {heading}", "", loss_table(rows, methods), ""]
    parts += ["## Seconds to fit a cell (set-up and training; scoring not included)", "",
              summary_table(rows, "fit_seconds"), ""]
    return "\n".join(parts)


def write_report(rows: list[dict], output: Path) -> list[Path]:
    """Write ``results.md``, ``accuracy.png`` and ``gap.png`` into ``output`` (atomically); return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    written = []
    write_text_atomic(output / "results.md", report_markdown(rows))
    written.append(output / "results.md")

    datasets = sorted({r["dataset"] for r in rows})
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in rows)]
    metrics = ["accuracy"] + (["calibrated_accuracy"] if any("calibrated" in r for r in rows) else [])
    fig, axes = plt.subplots(len(metrics), len(datasets), figsize=(5 * len(datasets), 4 * len(metrics)),
                             squeeze=False, sharey=True)
    for axes_row, metric in zip(axes, metrics, strict=True):
        for ax, dataset in zip(axes_row, datasets, strict=True):
            for offset, method in enumerate(methods):
                points = defaultdict(list)
                for r in rows:
                    if r["dataset"] == dataset and r["method"] == method and _metric(r, metric) is not None:
                        points[r["shots"]].append(_metric(r, metric))
                if points:
                    ks = sorted(points)
                    means = [statistics.fmean(points[k]) for k in ks]
                    stds = [statistics.stdev(points[k]) if len(points[k]) > 1 else 0.0 for k in ks]
                    shift = 1 + 0.025 * (offset - (len(methods) - 1) / 2)  # spread the error bars apart
                    ax.errorbar([k * shift for k in ks], means, yerr=stds, marker="o", capsize=3, label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["shots"] for r in rows}), [str(k) for k in sorted({r["shots"] for r in rows})])
            ax.set_title(dataset if metric == "accuracy" else f"{dataset}, contextual calibration")
            ax.set_xlabel("shots")
            ax.set_ylabel("test accuracy (mean ± std over seeds)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    written.append(_save_png(fig, output / "accuracy.png"))
    plt.close(fig)

    kinds = [(name, [m for m in methods if m in group]) for group, name, _ in LOSS_KINDS]
    kinds = [(name, mine) for name, mine in kinds if mine] or kinds[:1]  # one panel per loss scale present
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, (loss_name, group) in zip(axes[0], kinds, strict=True):
        finite = [r for r in rows if r["method"] in group and _finite(r.get("train_loss"), r.get("test_loss"))]
        for method in group:
            mine = [r for r in finite if r["method"] == method]
            if mine:
                ax.scatter([r["train_loss"] for r in mine], [r["test_loss"] for r in mine], label=method, alpha=0.7)
        lim = [0, max([r["test_loss"] for r in finite] + [1.0]) * 1.05]
        ax.plot(lim, lim, color="grey", linewidth=0.8, linestyle="--", label="train = test")
        ax.set_xlabel(f"train loss ({loss_name} on the training examples)")
        ax.set_ylabel(f"test loss ({loss_name} on the test set)")
        ax.set_title("generalisation gap: distance above the diagonal")
        ax.legend()
    fig.tight_layout()
    written.append(_save_png(fig, output / "gap.png"))
    plt.close(fig)
    return written


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _save_png(fig, path: Path) -> Path:
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    return write_file_atomic(path, image.getvalue())
