"""CPT's recipe study (issue 14, part 2): what training does to CPT's starting point, step by step.

For each dataset, shot count and seed it takes the shots of the ``cptune compare`` cell (same sampling,
so the same shots as the grid), lets ``template="auto"`` choose the template and label words from those
shots, and draws a **dev set** from what is neither the cell's test set nor its shots. Everything this
study reports is measured on that dev set, so a default chosen from it never reads a grid test example.

Per run it records zero-shot and ICL (CPT at step 0) on the dev set, then trains CPT with the default
recipe (or the ``--set`` changes) and at checkpoints records the dev accuracy, dev label loss, the
fraction of dev texts given each label, and the training loss of that step (the only criterion
computed on labelled data). One JSON line per run in ``OUT/trajectories.jsonl`` (rerunning skips runs
already there); the summary table is printed and written to ``OUT/recipe.md``.

    OMP_NUM_THREADS=1 python benchmarks/recipe_study.py --data rotten_tomatoes --shots 4 8
    OMP_NUM_THREADS=1 python benchmarks/recipe_study.py --data subj --shots 4 8
    python benchmarks/recipe_study.py --report-only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cptune.app.compare import Cell, append_result, cell_format, cell_splits
from cptune.cpt.roles import TokenRole
from cptune.cpt.saving import write_text_atomic
from cptune.data import Dataset, load_dataset, sample_splits
from cptune.methods import MethodSettings, frozen, make_method
from cptune.models import DEFAULT_MODEL, load_model
from cptune.scoring import CONTENT_FREE_TEXTS, contextual_calibration
from cptune.selection import choose_template
from cptune.training import batch_indices, train

TEST_SIZE = 300  # the grid's test size: the dev set avoids exactly those examples
DEV_SEED_OFFSET = 1000


def dev_set(dataset: Dataset, cell: Cell, size: int) -> tuple[list, list]:
    """The cell's shots and ``size`` balanced dev examples disjoint from its shots and its grid test set."""
    shots, _, test = cell_splits(dataset, cell, TEST_SIZE)
    taken = {ex.text for ex in test} | {ex.text for ex in shots}
    rest = Dataset(dataset.name, [ex for ex in dataset.examples if ex.text not in taken], dataset.labels,
                   dataset.provenance)
    _, _, dev = sample_splits(rest, 0, size, DEV_SEED_OFFSET + cell.seed)
    return shots, dev


def checkpoints(steps: int) -> list[int]:
    return sorted({0, *(round(steps * f) for f in (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1))})


def measure(method, dev: list) -> dict:
    """Dev accuracy, label loss and predicted-label shares, raw and with contextual calibration."""
    scores = method.scores([ex.text for ex in dev] + list(CONTENT_FREE_TEXTS))
    scores, content_free = scores[: len(dev)], scores[len(dev) :]
    labels = method.labels
    gold = torch.tensor([labels.index(str(ex.label)) for ex in dev])
    predicted = scores.argmax(-1)
    calibrated = contextual_calibration(scores, content_free).argmax(-1)
    return {"accuracy": float((predicted == gold).float().mean()),
            "loss": float(-scores[torch.arange(len(dev)), gold].mean()),
            "predicted_share": [float((predicted == i).float().mean()) for i in range(len(labels))],
            "calibrated_accuracy": float((calibrated == gold).float().mean()),
            "calibrated_share": [float((calibrated == i).float().mean()) for i in range(len(labels))]}


def train_query_loss(cpt, settings: MethodSettings, callback, leave_one_out: bool) -> list[float]:
    """The ``--loss`` variants: the loss is the training queries' label NLL alone (no context-label
    terms), each query (shot i) scored after the whole context (``query``) or after the context
    *without* demonstration i (``loo``). The same optimizer, schedule, batches and projection as
    :func:`cptune.train`; the trained delta is used in the full context afterwards, as in the default
    recipe."""
    model, queries, recipe = cpt.model, cpt._queries, settings.cpt_recipe().train
    example = cpt.context.example_index  # (N,)
    delta = model.prompt_encoder.delta
    delta.requires_grad_(True)
    optimizer = torch.optim.AdamW([delta], lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = recipe.total_steps(int(queries["input_ids"].shape[0]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    embed = model.base_model.get_input_embeddings()
    losses = []
    for step in range(total):
        rows = batch_indices(int(queries["input_ids"].shape[0]), recipe.batch_size, recipe.seed, step)
        context = model.context_embeddings()[0]  # (N, d), differentiable in delta
        optimizer.zero_grad(set_to_none=True)
        total_loss, count = 0.0, 0
        for row in rows.tolist():
            width = int(queries["attention_mask"][row].sum())
            ids = queries["input_ids"][row, :width]
            labels = torch.where(queries["input_type_mask"][row, :width] == TokenRole.LABEL, ids, -100)
            text_ids = ids[queries["input_type_mask"][row, :width] == TokenRole.INPUT_TEXT]
            if not set(text_ids.tolist()) <= set(cpt.context.token_ids[example == row].tolist()):
                raise RuntimeError(f"training query {row} is not demonstration {row} of the context")
            kept = context[example != row] if leave_one_out else context  # (N - n_i, d) or (N, d)
            inputs = torch.cat([kept, embed(ids)], dim=0)[None]
            targets = torch.cat([torch.full((kept.shape[0],), -100), labels])[None]
            logits = model.base_model(inputs_embeds=inputs).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, targets[0, 1:], ignore_index=-100, reduction="sum")
            total_loss = total_loss + nll
            count += int((targets != -100).sum())
        loss = total_loss / count
        loss.backward()
        optimizer.step()
        scheduler.step()
        model.project_()
        losses.append(loss.item())
        callback(step + 1, losses[-1])
    delta.requires_grad_(False)
    return losses


def run(base_model, tokenizer, dataset: Dataset, cell: Cell, settings: MethodSettings, dev_size: int,
        loss: str = "cpt") -> dict:
    shots, dev = dev_set(dataset, cell, dev_size)
    fmt, words = cell_format(dataset)
    start = time.perf_counter()
    choice = choose_template(base_model, tokenizer, [(ex.text, ex.label) for ex in shots], words, seed=cell.seed)
    chose = time.perf_counter() - start
    settings = settings.replace(seed=cell.seed)
    zero = make_method("zero-shot", base_model, tokenizer, choice.template, choice.label_words, settings)
    cpt = make_method("cpt", base_model, tokenizer, choice.template, choice.label_words, settings)
    cpt.prepare(shots)
    trajectory = [{"step": 0, "train_loss": None, **measure(cpt, dev)}]
    marks = set(checkpoints(settings.steps))

    def at_step(step: int, loss: float) -> None:
        if step in marks:
            trajectory.append({"step": step, "train_loss": loss, **measure(cpt, dev)})

    start = time.perf_counter()
    if loss in ("loo", "query"):
        with frozen(base_model, cell.seed):
            losses = train_query_loss(cpt, settings, at_step, leave_one_out=loss == "loo")
    else:
        losses = train(cpt.model, cpt._queries, settings.cpt_recipe().train, progress=False, callback=at_step).losses
    return {"dataset": cell.dataset, "shots": cell.shots, "seed": cell.seed, "method": "cpt", "dev_size": len(dev),
            "template": choice.template.format, "label_words": {str(k): v for k, v in choice.label_words.items()},
            "choice_seconds": round(chose, 1), "train_seconds": round(time.perf_counter() - start, 1),
            "zero_shot": measure(zero, dev), "trajectory": trajectory, "losses": losses,
            "settings": {k: v for k, v in vars(settings).items() if k != "seed"}
            | ({"loss": loss} if loss != "cpt" else {}),
            "machine": {"platform": platform.platform(), "torch": torch.__version__}}


def read_runs(path: Path) -> list[dict]:
    """The runs in ``path`` (complete lines only: a line cut short by a kill is skipped and rerun)."""
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "trajectory" in row:
            runs.append(row)
    return runs


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else "–"


def report(rows: list[dict]) -> str:
    lines = ["Dev accuracy (mean over seeds; the dev set is disjoint from the grid's test sets), zero-shot and "
             "CPT at each checkpoint of its run (step 0 = ICL); *train loss*: that step's training loss; "
             "*max share*: the mean share of dev texts given the most-predicted label.", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["shots"], settings_key(r["settings"])), []).append(r)
    default = json.dumps(vars(MethodSettings()) | {}, sort_keys=True)
    for (dataset, shots, settings), runs in sorted(groups.items()):
        changed = {k: v for k, v in json.loads(settings).items() if json.loads(default).get(k) != v}
        name = ", ".join(f"{k}={v}" for k, v in changed.items()) or "default recipe"
        lines += [f"**{dataset}, {shots} shots, {name}** ({len(runs)} seeds: "
                  f"{', '.join(str(r['seed']) for r in sorted(runs, key=lambda r: r['seed']))}; zero-shot "
                  f"{_mean([r['zero_shot']['accuracy'] for r in runs])})", "",
                  "| step | dev accuracy | calibrated | dev loss | max share | train loss |",
                  "|---|---|---|---|---|---|"]
        for i, point in enumerate(runs[0]["trajectory"]):
            at = [r["trajectory"][i] for r in runs if len(r["trajectory"]) > i]
            train_losses = [p["train_loss"] for p in at if p["train_loss"] is not None]
            calibrated = [p["calibrated_accuracy"] for p in at if "calibrated_accuracy" in p]
            lines.append(f"| {point['step']} | {_mean([p['accuracy'] for p in at])} | {_mean(calibrated)} "
                         f"| {_mean([p['loss'] for p in at])} "
                         f"| {_mean([max(p['predicted_share']) for p in at])} | {_mean(train_losses)} |")
        lines.append("")
    return "\n".join(lines)


def parse_set(items: list[str]) -> dict:
    """``NAME=VALUE`` items as MethodSettings changes: the value as JSON, else as text (``radius=relative``)."""
    changes = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
    return changes


def settings_key(settings: dict) -> str:
    """A run's settings as the key that decides whether it is done; a setting a row lacks did not exist
    when it ran (e.g. ``radius``) and ran with its default."""
    defaults = {k: v for k, v in vars(MethodSettings()).items() if k != "seed"}
    return json.dumps(defaults | settings, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["rotten_tomatoes", "subj"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--dev-size", type=int, default=150)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a MethodSettings change (JSON value, else text), e.g. steps=80 or radius=relative")
    parser.add_argument("--loss", choices=["cpt", "query", "loo"], default="cpt",
                        help="cpt: the default recipe's loss; query: the queries' label NLL only; loo: that, each "
                             "shot as a query after the context without it (see train_query_loss)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="runs/recipe")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.out) / "trajectories.jsonl"
    settings = MethodSettings().replace(**parse_set(args.set))
    if not args.report_only:
        rows = read_runs(path)
        done = {(r["dataset"], r["shots"], r["seed"], settings_key(r["settings"])) for r in rows}
        key = settings_key({k: v for k, v in vars(settings).items() if k != "seed"}
                           | ({"loss": args.loss} if args.loss != "cpt" else {}))
        todo = [(d, k, s) for d in args.data for k in args.shots for s in args.seeds if (d, k, s, key) not in done]
        base_model, tokenizer = load_model(args.model, device="cpu", dtype="float32") if todo else (None, None)
        datasets = {name: load_dataset(name, default_split="train") for name in args.data}
        for name, shots, seed in todo:
            row = run(base_model, tokenizer, datasets[name], Cell(name, shots, seed, "cpt"), settings, args.dev_size,
                      args.loss)
            append_result(path, row)
            last = row["trajectory"][-1]
            print(f"{name} k={shots} seed={seed}: zero-shot {row['zero_shot']['accuracy']:.3f}, ICL "
                  f"{row['trajectory'][0]['accuracy']:.3f}, CPT {last['accuracy']:.3f} "
                  f"({row['train_seconds']} s; {row['template']!r})", flush=True)
    table = report(read_runs(path))
    write_text_atomic(Path(args.out) / "recipe.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
