"""``compile=True`` (torch.compile of the training forward and of the scorer) changes no result.

GPT-2 in float64: its LayerNorm computes in the model's dtype (Llama-style RMSNorms up-cast to float32,
which would put float32 roundings into a float64 comparison). Compiled kernels may fuse operations and
sum in another order; each such change moves a result by a few float64 roundings (eps = 2.2e-16
relative), and the tiny model's two layers, the loss and two AdamW steps amplify that by far less than
1e4, so 1e-10 relative bounds rounding alone, while a real change (a lost mask, a wrong position)
moves the loss by 1e-3 or more. The delta is float32 (its gradient is rounded to float32, where a
float64 change can flip one rounding, eps32 / 2, which AdamW passes on in proportion): there the
bound is a few float32 roundings; scores come back in float32: there it is two.
"""

import copy

import pytest
import torch

import cptune
from conftest import LABEL_WORDS, TEMPLATE
from cptune.scoring import ContextScorer
from cptune.training import TrainSettings, train
from tiny import tiny_model

_FLOAT64_RTOL = 1e-10
_EPS32 = torch.finfo(torch.float32).eps
_DELTA_RTOL = 4 * _EPS32
_SCORE_RTOL = 2 * _EPS32


@pytest.mark.slow  # compiling takes about a minute on a 2-core CPU
def test_compiled_training_and_scoring_give_the_same_results(context, queries, tok):
    base = tiny_model("gpt2", dtype=torch.float64)
    runs = {}
    for compile_it in (False, True):
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config())
        seen = []  # whether the forwards ran compiled, step by step

        def note(step, loss, model=model, seen=seen):
            seen.append(model.compiled)

        result = train(model, queries, TrainSettings(steps=2, batch_size=3, lr=1e-2), progress=False,
                       compile=compile_it, callback=note)
        assert seen == [compile_it] * 2 and not model.compiled  # on for the run only
        with torch.no_grad():
            embeds = model.context_embeddings()
        scorer = ContextScorer(model.base_model, tok, TEMPLATE, LABEL_WORDS, embeds, batch_size=4, compile=compile_it)
        assert (scorer.runner is not model.base_model) == compile_it
        scores = scorer.scores(scorer.query_ids(["the actors shine", "far too long and dull", "wonderful"]))
        runs[compile_it] = (torch.tensor(result.losses, dtype=torch.float64), model.prompt_encoder.delta.detach(),
                            scores)
    (losses, delta, scores), (c_losses, c_delta, c_scores) = runs[False], runs[True]
    assert torch.allclose(c_losses, losses, rtol=_FLOAT64_RTOL, atol=0), (c_losses - losses)
    assert delta.abs().max() > 0  # training moved the delta, so the comparison below means something
    assert (c_delta - delta).abs().max() <= _DELTA_RTOL * delta.abs().max()
    assert torch.allclose(c_scores, scores, rtol=_SCORE_RTOL, atol=0), (c_scores - scores)
