"""Shells over the layers: ``classifier`` (CPTClassifier), ``demo`` (the main job), ``compare`` (the method grid:
cells, resumable JSONL, table, plots) and ``cli`` (the ``cptune`` command)."""
