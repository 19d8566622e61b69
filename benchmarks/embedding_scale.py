"""A model's embedding scale and the radii ``radius="relative"`` gives it (issue 24, item 3).

Prints the median L2 norm of the model's input-embedding rows as its embedding module outputs them
(:func:`cptune.recipe.model_embedding_scale`), its ratio to SmolLM2-135M's
(:data:`cptune.cpt.projection.REFERENCE_EMBEDDING_SCALE`, measured with this script), and the default
epsilons and radii of both modes:

    OMP_NUM_THREADS=1 python benchmarks/embedding_scale.py                      # SmolLM2-135M, the reference
    OMP_NUM_THREADS=1 python benchmarks/embedding_scale.py --model "$(python benchmarks/gemma_model.py)"
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from cptune.cpt.embedding import embedding_row_norms
from cptune.cpt.projection import RADIUS_REFERENCE_DIM, REFERENCE_EMBEDDING_SCALE, embedding_scale, relative_epsilon
from cptune.models import DEFAULT_MODEL, load_model
from cptune.recipe import CPTRecipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    base, _ = load_model(args.model, device="cpu", dtype="float32")
    norms = embedding_row_norms(base.get_input_embeddings())
    scale = embedding_scale(norms)
    hidden = base.get_input_embeddings().weight.shape[-1]
    recipe = CPTRecipe()
    factor = math.sqrt(hidden / RADIUS_REFERENCE_DIM)
    report = {
        "model": args.model, "rows": norms.numel(), "hidden_size": hidden,
        "median_row_norm": scale, "mean_row_norm": float(norms.mean()),
        "quartiles": [float(q) for q in torch.quantile(norms, torch.tensor([0.25, 0.75]))],
        "ratio_to_reference": scale / REFERENCE_EMBEDDING_SCALE,
        "absolute": {"eps_input": recipe.eps_input, "radius_input": recipe.eps_input * factor,
                     "eps_format": recipe.eps_format, "radius_format": recipe.eps_format * factor},
        "relative": {"eps_input": relative_epsilon(recipe.eps_input, scale),
                     "radius_input": relative_epsilon(recipe.eps_input, scale) * factor,
                     "eps_format": relative_epsilon(recipe.eps_format, scale),
                     "radius_format": relative_epsilon(recipe.eps_format, scale) * factor},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
