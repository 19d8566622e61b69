"""Read time of a 200,000-row CSV and JSONL file: by load_file, and by annotate_file's reader alone.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/read_files.py [--rows 200000] [--repeat 1]

It writes the two files into a temporary folder (seeded texts of 15 words with commas and quotes, a quoted
newline in every 50th, an integer label), then times, per file: ``cptune.data.load_file`` (the whole read into a
Dataset: parsing, label types, text normalisation) and the reader ``cptune predict --file`` streams through
(open, the checking and counting pass, then every batch of 64 rows with its texts), no classifier and no writing.
It also counts the lines and code lines (no blank, comment or docstring lines) of the modules that read and
write data files. On a tree from before cptune.data.tables (commit d489a66), PYTHONPATH pointing at that tree's
src/ measures the readers of that time (annotate's private ``_open_table``) with the same command.
Figures: docs/data.md.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import random
import tempfile
import time
import tokenize
from pathlib import Path

import cptune
from cptune.app import annotate
from cptune.data import load_file

WORDS = "the a film movie great bad dull fun long short actor plot scene, story \"quoted\" ending".split()
TEXT_WORDS = 15
NEWLINE_EVERY = 50  # every 50th text holds a newline inside its quoted CSV cell
BATCH = 64  # annotate_file's default batch_size
MODULES = ("data/files.py", "app/annotate.py", "data/tables.py")


def write_files(folder: Path, rows: int, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        text = " ".join(rng.choices(WORDS, k=TEXT_WORDS)) + ("\nsecond line" if i % NEWLINE_EVERY == 0 else "")
        records.append({"id": i, "text": text, "label": i % 2})
    paths = {"csv": folder / "reviews.csv", "jsonl": folder / "reviews.jsonl"}
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        f.write("id,text,label\n")
        f.writelines(f'{r["id"]},"{r["text"].replace(chr(34), 2 * chr(34))}",{r["label"]}\n' for r in records)
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def read_like_annotate(path: Path) -> int:
    """What annotate_file reads before and while classifying: returns the rows whose text was read."""
    try:
        from cptune.data.tables import open_table
    except ImportError:  # a tree from before cptune.data.tables: the readers of that time
        table = annotate._open_table(path, path.suffix, "text", BATCH, False)
        return sum(len(batch.texts) for batch in table.batches(BATCH))
    table = open_table(path)

    def texts(batch) -> list:
        return [annotate.text_of(cell, "text", table.where(n)) for n, cell in zip(batch.numbers,
                                                                               batch.column("text"), strict=True)]

    table.survey(BATCH, check=texts if table.format == ".jsonl" else None)
    return sum(len(texts(batch)) for batch in table.batches(BATCH))


def best_time(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring or a string statement."""
    source = path.read_text(encoding="utf-8")
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):  # docstrings, and the strings that document a constant
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.update(range(node.lineno, node.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    code: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            code.update(range(token.start[0], token.end[0] + 1))
    return len(code - docstrings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is reported")
    args = parser.parse_args()
    package = Path(cptune.__file__).parent
    print(f"cptune from {package}")
    for name in MODULES:
        if (package / name).exists():
            text = (package / name).read_text(encoding="utf-8")
            print(f"  {name}: {len(text.splitlines())} lines, {code_lines(package / name)} code lines")
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(Path(folder), args.rows)
        for kind, path in paths.items():
            mib = path.stat().st_size / 2**20
            loaded = best_time(lambda p=path: load_file(p), args.repeat)
            streamed = best_time(lambda p=path: read_like_annotate(p), args.repeat)
            print(f"  {kind:5} {args.rows} rows ({mib:.1f} MiB): load_file {loaded:.2f} s, "
                  f"annotate_file's reader {streamed:.2f} s")


if __name__ == "__main__":
    main()
