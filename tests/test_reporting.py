"""The Python API reports as the command line does, through logging and tqdm, and can be silenced;
cptune's warnings are one line in its own voice."""

import logging
import re
import subprocess
import sys
import warnings

import pytest

from cptune import reporting

FIT = """
import logging, sys
from cptune import CPTClassifier, TrainSettings
if sys.argv[2] == "level":
    logging.getLogger("cptune").setLevel(logging.WARNING)
texts = ["a fun film", "a dull film", "a great film", "a bad film"] * 2
clf = CPTClassifier(sys.argv[1], labels={0: "negative", 1: "positive"}, train=TrainSettings(steps=3),
                    verbose=sys.argv[2] != "quiet")
clf.fit(texts, [1, 0, 1, 0] * 2)
clf.predict(texts)
print("DONE")
"""


def _fit(tiny_dir, mode):
    out = subprocess.run([sys.executable, "-c", FIT, str(tiny_dir), mode], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "DONE" in out.stdout, out.stderr
    return out.stderr


def test_fit_reports_placement_choice_context_and_progress(tiny_dir):
    err = _fit(tiny_dir, "verbose")
    lines = err.splitlines()
    assert any(line.startswith(f"cptune: model {tiny_dir} on cpu, float32") for line in lines), err
    assert any(line.startswith("cptune: chose template ") for line in lines), err
    assert any(line.startswith("cptune: context: 8 demonstrations") for line in lines), err
    assert "choose template" in err and "train" in err and "3/3" in err  # the tqdm bars


@pytest.mark.parametrize("mode", ["quiet", "level"])
def test_verbose_false_or_the_logging_level_silences_it(tiny_dir, mode):
    assert _fit(tiny_dir, mode).strip() == ""


def test_quiet_and_nested_bars():
    assert reporting.showing()
    with reporting.quiet():
        assert not reporting.showing()
        with reporting.progress(3, "x") as bar:
            assert bar.disable
    with reporting.quiet(False):
        assert reporting.showing()
    with reporting.progress(3, "outer") as outer, reporting.progress(3, "inner") as inner:
        assert not outer.disable and inner.disable  # only the outermost bar is drawn


def test_a_notice_while_a_bar_is_drawn_is_written_above_it_not_into_its_line(capsys):
    reporting.install(handler=True)  # as the command line does
    with reporting.progress(3, "choose template") as bar:
        bar.update(1)
        # the layout notice comes from a lower layer's logger the first time a model runs, inside the bar
        logging.getLogger("cptune.cpt.engine").info("queries for LlamaForCausalLM: packed")
        bar.update(2)
    err = capsys.readouterr().err
    assert "choose template" in err and "3/3" in err, err
    assert "cptune: queries for LlamaForCausalLM: packed" in re.split(r"[\r\n]", err), repr(err)  # a line of its own


def test_cptune_warnings_are_one_line_without_the_source():
    message = warnings.WarningMessage("data.csv: 2 rows without text skipped", reporting.CptuneWarning,
                                      "/somewhere/cptune/data/files.py", 268)
    assert warnings.formatwarning(message.message, message.category, message.filename, message.lineno) == \
        "cptune: warning: data.csv: 2 rows without text skipped\n"
    other = warnings.formatwarning("x", UserWarning, "f.py", 3)
    assert "f.py:3" in other  # other libraries' warnings keep Python's format


def test_plural():
    assert reporting.plural(1, "step") == "1 step" and reporting.plural(2, "step") == "2 steps"
    assert reporting.plural(0, "training query", "training queries") == "0 training queries"
