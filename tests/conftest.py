"""Shared fixtures: offline mode and tiny models (see tiny.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import cptune  # noqa: E402
from tiny import save_tiny_model, tiny_tokenizer  # noqa: E402

DEMOS = [
    ("a gripping, funny and moving film", "pos"),
    ("dull, lifeless and far too long", "neg"),
    ("the best movie of the year", "pos"),
    ("a waste of time", "neg"),
]
QUERIES = [
    ("the actors shine", "pos"),
    ("the plot is thin", "neg"),
    ("wonderful", "pos"),
    ("terrible, bad", "neg"),
    ("great", "pos"),
    ("far too long and dull", "neg"),
]
LABEL_WORDS = {"pos": "positive", "neg": "negative"}
TEMPLATE = cptune.Template("input: {x} output: {y}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def context(tok):
    return cptune.build_context(DEMOS, TEMPLATE, tok, LABEL_WORDS)


@pytest.fixture
def queries(tok):
    return cptune.render_queries(QUERIES, TEMPLATE, tok, LABEL_WORDS)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a model folder, for the CLI and subprocesses (modules may override it)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
