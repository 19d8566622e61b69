"""cptune on a real local Ray cluster (2 CPUs, started once): predict --file --ray and compare --ray give what the
single-process runs give; a failure leaves no output; a failed cell is reported and the others go on."""

import csv
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from cptune.app.annotate import annotate_file
from cptune.app.cli import main
from cptune.app.compare import read_results
from cptune.reporting import CptuneWarning
from tiny import write_rows

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    'a gripping film, "funny" and\nmoving',  # a comma, quotes and a newline inside one CSV cell
    "dull,  lifeless   and far too long",
    "café — naïve crème brûlée 😀",
    "   ",  # blank: empty prediction cells
    "the best movie of the year",
    "a waste of time",
    "",
    "the actors shine",
    "terrible, bad",
    "wonderful\tand great",
    "007",  # a CSV cell that looks like a number stays the same string
] * 3
ROWS = [{"id": i + 1, "text": text, "score": i * 1.25 - 3, "label": "pos" if i % 2 else "neg"}
        for i, text in enumerate(TEXTS)]
PROBABILITY_TOLERANCE = 1e-6  # the bound on the CPU
TEXT_ROUNDING = 1e-6  # CSV/TSV/JSONL write probabilities with 6 decimals: one step of rounding on top
TIMING_FIELDS = ("fit_seconds", "score_seconds")
# A read that waited for a CPU held by the actors would wait for ever; reading these few rows takes seconds, so a
# read still going after this long is that wait, and the test says so rather than hanging the suite.
READ_DEADLOCK_S = 300


@pytest.fixture(scope="module")
def cluster():
    """A real local cluster; workers import cptune (and this folder) from this checkout."""
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    """A trained tiny classifier saved to a folder, and the same loaded in this process."""
    from cptune import CPTClassifier, TrainSettings

    folder = tmp_path_factory.mktemp("clf") / "classifier"
    clf = CPTClassifier(str(tiny_dir), labels={"pos": "positive", "neg": "negative"},
                        train=TrainSettings(steps=2, batch_size=2, lr=1e-2, seed=4))
    clf.fit(["a joy", "a bore", "great fun", "too long"], ["pos", "neg", "pos", "neg"])
    clf.save(folder)
    return folder, CPTClassifier.load(folder)


def read_output(path: Path) -> list[dict]:
    if path.suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    return pq.read_table(path).to_pylist()


def assert_same_annotation(got: Path, want: Path) -> None:
    """The same columns, rows and order; the same cells but the probabilities, which agree within 1e-6."""
    got_rows, want_rows = read_output(got), read_output(want)
    assert len(got_rows) == len(want_rows) == len(ROWS)
    rounding = 0 if got.suffix == ".parquet" else TEXT_ROUNDING
    for g, w in zip(got_rows, want_rows, strict=True):
        assert list(g) == list(w)
        for column in w:
            if not column.startswith("p_"):
                assert g[column] == w[column], column
            elif w[column] in (None, ""):
                assert g[column] == w[column]
            else:
                assert abs(float(g[column]) - float(w[column])) <= PROBABILITY_TOLERANCE + rounding
    if got.suffix == ".parquet":
        assert pq.read_schema(got).equals(pq.read_schema(want))  # the same column types, metadata included
    else:
        first = [path.read_bytes().split(b"\n", 1)[0] for path in (got, want)]
        assert first[0] == first[1]  # the same header (CSV/TSV), the same first object's bytes up to rounding


@pytest.mark.slow  # an actor pool per case (each loads torch and the model): minutes on this loaded 2-core machine
@pytest.mark.parametrize("source_name, output_name", [
    ("in.csv", "out.csv"), ("in.tsv", "out.tsv"), ("in.jsonl", "out.jsonl"), ("in.parquet", "out.parquet"),
    ("in.csv", "out.parquet"), ("in.parquet", "out.jsonl"),
])
def test_ray_annotation_equals_the_single_process_one(cluster, saved, tmp_path, source_name, output_name):
    from cptune.app.onray import annotate_file_ray

    folder, clf = saved
    source = tmp_path / source_name
    write_rows(source, ROWS)
    source_bytes = source.read_bytes()
    want, got = tmp_path / f"want-{output_name}", tmp_path / f"got-{output_name}"
    annotate_file(clf, source, want, progress=False)

    # 2 one-thread workers, 5 rows per batch: the rows meet the actors in other batches than annotate_file's
    assert annotate_file_ray(folder, source, got, batch_size=5, workers=2, progress=False) == len(ROWS)

    assert source.read_bytes() == source_bytes
    assert_same_annotation(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source_name, want.name, got.name])  # no temp file


@pytest.mark.slow
def test_a_folder_of_files_is_read_in_name_order(cluster, saved, tmp_path):
    from cptune.app.onray import annotate_file_ray

    folder, clf = saved
    parts = tmp_path / "parts"
    parts.mkdir()
    write_rows(parts / "b.csv", ROWS[10:])  # written first, read second
    write_rows(parts / "a.csv", ROWS[:10])
    whole = tmp_path / "whole.csv"
    write_rows(whole, ROWS)
    want, got = tmp_path / "want.csv", tmp_path / "got.csv"
    annotate_file(clf, whole, want, progress=False)
    assert annotate_file_ray(folder, parts, got, workers=2, progress=False) == len(ROWS)
    assert_same_annotation(got, want)


def count_rows(dataset, counted: list) -> None:
    """Read every block of ``dataset`` (its tasks run) and append the number of rows."""
    counted.append(sum(batch.num_rows for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow")))


def test_reading_asks_for_no_cpu_so_the_actors_may_hold_them_all(cluster, tmp_path):
    """The actors take the cluster's CPUs, so every task that reads the input must ask for none: one waiting for
    a CPU behind them waits for ever, the actors idle for want of input. (Ray 2.60's default Parquet reader lists
    the files in a task that asks for a CPU whatever num_cpus says: the Parquet runs hung now and then.) Here
    something else holds every CPU while each format is read."""
    from cptune.app.onray import input_files, read_input

    datasets = {}
    for name in ("in.csv", "in.tsv", "in.jsonl", "in.parquet"):
        write_rows(tmp_path / name, ROWS)
        files, in_format = input_files(tmp_path / name)
        # made before the CPUs are taken, as a run makes it before its actors start (Parquet samples its files then)
        datasets[name] = read_input(ray, files, in_format, list(ROWS[0]))
    holder = ray.util.placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(holder.ready())
    try:
        for name, dataset in datasets.items():
            counted = []
            reader = threading.Thread(target=count_rows, args=(dataset, counted), daemon=True)
            reader.start()
            reader.join(READ_DEADLOCK_S)
            assert not reader.is_alive(), f"reading {name} waited {READ_DEADLOCK_S} s for a CPU the actors would hold"
            assert counted == [len(ROWS)]
    finally:
        ray.util.remove_placement_group(holder)


def test_the_cli_writes_the_same_file_and_refuses_mistakes_in_one_line(cluster, saved, tmp_path, capsys):
    folder, clf = saved
    source, want, got = tmp_path / "in.csv", tmp_path / "want.csv", tmp_path / "got.csv"
    write_rows(source, ROWS)
    annotate_file(clf, source, want, progress=False)
    assert main(["predict", str(folder), "--file", str(source), "--output", str(got), "--ray",
                 "--ray-workers", "2"]) == 0
    assert_same_annotation(got, want)
    err = capsys.readouterr().err
    assert "27 rows annotated" in err and "6 rows without text left blank" in err  # as annotate_file says it

    capsys.readouterr()
    assert main(["predict", str(folder), "--file", str(source), "--output", str(got), "--ray"]) == 2  # exists
    assert main(["predict", str(folder), "--file", str(source), "--output", str(tmp_path / "x.csv"), "--ray",
                 "--text-column", "review"]) == 2
    assert main(["predict", str(folder), "a text", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("cptune: error: ") for line in err)
    assert "exists" in err[0] and "'review' not found" in err[1] and "--ray annotates a data --file" in err[2]


def test_a_failure_mid_way_leaves_no_output_and_an_existing_one_untouched(cluster, saved, tmp_path, capsys):
    folder, _ = saved
    rows = [dict(row) for row in ROWS]
    rows[-4]["text"] = "far too long " * 1500  # more positions than the tiny model's 2048: its batch fails
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    write_rows(source, rows)
    output.write_bytes(b"an earlier result\n")
    assert main(["predict", str(folder), "--file", str(source), "--output", str(output), "--overwrite", "--ray",
                 "--ray-workers", "2"]) == 2  # the user's data: a usage mistake, as without --ray
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cptune: error: ") and "positions" in err[-1]
    assert output.read_bytes() == b"an earlier result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]  # no temporary file left


def test_without_ray_the_option_says_how_to_install_it(saved, tiny_dir, tmp_path, capsys, monkeypatch):
    folder, _ = saved
    source = tmp_path / "in.csv"
    write_rows(source, ROWS)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed: `import ray` fails
    assert main(["predict", str(folder), "--file", str(source), "--output", str(tmp_path / "o.csv"), "--ray"]) == 2
    assert main(["compare", "--model", str(tiny_dir), "--output", str(tmp_path / "g"), "--ray",
                 "--methods", "icl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all(line.startswith("cptune: error: --ray needs ray") and "pip install 'cptune[ray]'" in line
               for line in err)


GRID = ["--shots", "2", "--seeds", "0", "1", "--methods", "zero-shot", "icl", "--test-size", "4"]


def _rows_by_cell(rows):
    return {(r["dataset"], r["shots"], r["seed"], r["method"]): {k: v for k, v in r.items() if k not in TIMING_FIELDS}
            for r in rows}


def _same_but_rounding(left, right, path="row"):
    """Equal, save that floats may differ by summation order: a Ray cell runs on its 1 CPU's thread, the serial
    grid on torch's default threads, and reductions split over threads round differently (~1e-7 seen in CI)."""
    if isinstance(left, float) or isinstance(right, float):
        assert isinstance(left, (int, float)) and isinstance(right, (int, float)), path
        assert left == pytest.approx(right, rel=1e-5, abs=1e-6), path
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), path
        for key in left:
            _same_but_rounding(left[key], right[key], f"{path}[{key!r}]")
    elif isinstance(left, list):
        assert isinstance(right, list) and len(left) == len(right), path
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            _same_but_rounding(a, b, f"{path}[{i}]")
    else:
        assert left == right, path


def test_grid_on_ray_equals_the_serial_grid_and_resumes_either_way(cluster, tiny_dir, tmp_path):
    common = ["compare", "--model", str(tiny_dir), "--dataset", "rotten_tomatoes", *GRID]
    serial, on_ray = tmp_path / "serial", tmp_path / "ray"
    assert main([*common, "--output", str(serial)]) == 0
    # half the grid serially, the rest on Ray: the Ray run resumes the serial one's file
    assert main([*common, "--only", "seed=0", "--output", str(on_ray)]) == 0
    assert main([*common, "--output", str(on_ray), "--ray", "--ray-cpus-per-cell", "1"]) == 0
    serial_rows, damaged = read_results(serial / "results.jsonl")
    ray_rows, ray_damaged = read_results(on_ray / "results.jsonl")
    assert damaged == ray_damaged == 0 and len(ray_rows) == len(serial_rows) == 4
    _same_but_rounding(_rows_by_cell(ray_rows), _rows_by_cell(serial_rows))
    assert (on_ray / "results.md").is_file()


def test_a_failed_cell_is_reported_and_the_others_finish(cluster, tiny_dir, tmp_path, capsys):
    data = tmp_path / "small.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows([[f"review number {i} was {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg"]
                          for i in range(12)])
    out = tmp_path / "grid"
    args = ["compare", "--model", str(tiny_dir), "--dataset", str(data), "--shots", "2", "50", "--seeds", "0",
            "--methods", "zero-shot", "--test-size", "4", "--label-words", "pos=positive,neg=negative",
            "--output", str(out)]
    capsys.readouterr()
    with pytest.warns(CptuneWarning) as warned:  # printed as one `cptune: warning: ...` line by the CLI
        status = main([*args, "--ray"])
    err = capsys.readouterr().err
    assert status == main(args) == 2  # as the serial run, which stops at the failing cell
    (row,) = read_results(out / "results.jsonl")[0]  # the cell with 2 shots finished
    assert row["shots"] == 2
    (failed,) = [str(w.message) for w in warned if "failed" in str(w.message)]
    assert failed.startswith("cell ") and "k=50" in failed and "ValueError: class 'neg'" in failed
    assert "\n" not in failed
    assert err.count("cptune: error: ") == 1  # the failed cell's own error last, as a serial run stopping there
    assert "25 were asked" in err.split("cptune: error: ")[1]
