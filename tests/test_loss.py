import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.cpt.model import CPTEmbedding as PeftCPTEmbedding
from transformers.modeling_outputs import CausalLMOutput

from cptune import CPTConfig, CPTEmbedding
from cptune.cpt.loss import label_group_rank


def _loop_rank(codes):
    """The definition, one token at a time."""
    out = torch.zeros_like(codes)
    for b in range(codes.shape[0]):
        labels = sorted({int(c) for c in codes[b] if c > 0 and c % 4 == 0})
        for t in range(codes.shape[1]):
            c = int(codes[b, t])
            if c > 0 and c % 4 == 0:
                out[b, t] = sum(1 for x in labels if x > c)
    return out


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_label_group_rank_matches_definition(b, length, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 25, (b, length), generator=gen)
    assert torch.equal(label_group_rank(codes), _loop_rank(codes))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["none", "decay"]), st.floats(0.1, 1.0), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_calculate_loss_matches_peft(loss_type, gamma, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    # context: 3 demonstrations, then a query shifted to example 3
    ctx = [1, 2, 2, 3, 4, 0, 5, 6, 7, 8, 8, 0, 9, 10, 11, 12]
    query = [13, 14, 14, 15, 16, 16, 0]
    codes = torch.tensor(ctx + query).repeat(batch, 1)
    vocab = 11
    labels = torch.randint(0, vocab, codes.shape, generator=gen)
    labels[~((codes > 0) & (codes % 4 == 0))] = -100
    logits = torch.randn(batch, codes.shape[1], vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    cfg = CPTConfig(cpt_token_ids=list(range(len(ctx))), cpt_tokens_type_mask=ctx,
                    opt_weighted_loss_type=loss_type, opt_loss_decay_factor=gamma)
    ours = CPTEmbedding.calculate_loss(CausalLMOutput(logits=logits), labels, codes, cfg).loss
    theirs = PeftCPTEmbedding.calculate_loss(CausalLMOutput(logits=logits), labels.clone(), codes.clone(),
                                             copy.deepcopy(cfg)).loss
    assert torch.allclose(ours, theirs, rtol=1e-6)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(theirs, logits)
    assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-12)
