"""The shared-prefix engine's one-pass layout against the padded one: logits, gradients, scores, the mask."""

import pytest
import torch

from cptune.cpt.engine import PREFIX_SEGMENT, encode_prefix, onepass_mask, run_prefixed, run_queries
from cptune.scoring import label_log_likelihoods
from tiny import ARCHITECTURES, tiny_model

# Float64 runs differ only in summation order (a few hundred roundings of 1e-16); float32 in the
# same way at 6e-8 per rounding, plus the float32 norms of some architectures (see test_matrix.py).
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _inputs(model, prefix_len=40, lengths=(5, 9, 3, 12)):
    """Random prefix embeddings ``(1, P, d)`` and query ids; P beyond Gemma3's window of 16 twice over."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    table = model.get_input_embeddings()
    prefix = table(torch.randint(3, vocab, (1, prefix_len), generator=gen)).detach()
    prefix = prefix + 0.01 * torch.randn(prefix.shape, generator=gen, dtype=prefix.dtype)
    queries = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    keep = [torch.arange(0, n, 2) for n in lengths]  # every other position
    return prefix, queries, keep


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_onepass_gives_the_padded_logits_and_prefix_gradient(arch, dtype):
    model = tiny_model(arch, dtype=dtype)
    prefix, queries, keep = _inputs(model)
    prefix_keep = torch.tensor([0, 17, 39])
    results = {}
    for layout in ("padded", "onepass"):
        embeds = prefix.clone().requires_grad_(True)
        prefix_logits, logits = run_prefixed(model, embeds, prefix_keep, queries, keep, layout)
        # A loss that weighs every kept logit differently, so a misplaced row changes the gradient.
        weights = torch.linspace(0.5, 1.5, logits.numel(), dtype=dtype).view_as(logits)
        (prefix_logits.square().mean() + (weights * logits.log_softmax(-1)).sum()).backward()
        results[layout] = (prefix_logits.detach(), logits.detach(), embeds.grad)
    tol = _TOLERANCE[dtype]
    for expected, got in zip(results["padded"], results["onepass"], strict=True):
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= tol * expected.abs().max(), (got - expected).abs().max()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_onepass_after_an_encoded_prefix_and_in_scoring(arch):
    """run_queries(layout="onepass") reruns the prefix from its embeddings: the padded logits, and so
    the same label scores (what the scorer and the server call)."""
    model = tiny_model(arch, dtype=torch.float64)
    prefix_embeds, queries, keep = _inputs(model)
    prefix = encode_prefix(model, prefix_embeds)
    padded = run_queries(model, prefix, queries, keep, "padded")
    onepass = run_queries(model, prefix, queries, keep, "onepass")
    assert (onepass - padded).abs().max() <= _TOLERANCE[torch.float64] * padded.abs().max()
    rows = [q.tolist() for q in queries]
    labels = [[5], [9, 11]]  # one multi-token label: every label token is scored
    scores = {layout: label_log_likelihoods(model, prefix, rows, labels, batch_size=3, layout=layout)
              for layout in ("padded", "onepass")}
    # Scores come back float32 (the scorer's contract): equal to float32 rounding.
    assert torch.allclose(scores["onepass"], scores["padded"], rtol=1e-6, atol=0)


def test_onepass_mask_rows_see_the_prefix_and_their_own_query_only():
    # A prefix of 3 tokens (positions 0-2), then query 0 (2 tokens) and query 1 (1 token), both from position 3.
    segment = torch.tensor([PREFIX_SEGMENT] * 3 + [0, 0, 1])
    position = torch.tensor([0, 1, 2, 3, 4, 3])
    ok = onepass_mask(segment, position, segment, position)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(ok, expected)
    # A window of 2 by position: query 0's second token (position 4) keeps positions 3 and 4 only;
    # query 1's token (position 3) keeps the prefix's position 2 and itself.
    windowed = onepass_mask(segment, position, segment, position, window=2)
    assert windowed[4].nonzero().flatten().tolist() == [3, 4]
    assert windowed[5].nonzero().flatten().tolist() == [2, 5]
