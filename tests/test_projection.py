import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cptune.cpt.projection import RADIUS_REFERENCE_DIM, project_l2_ball, token_radii
from cptune.cpt.roles import TokenRole

RADII = st.one_of(st.just(0.0), st.floats(1e-6, 2.0))


# Relative distance to the sphere allowed after projecting, per dtype (a few ulps).
SPHERE_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.sampled_from([1, 2, 16, 576]), RADII, st.floats(0.01, 10.0),
       st.integers(0, 2**31 - 1), st.sampled_from(list(SPHERE_RTOL)))
def test_projection_properties(n, d, radius, scale, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    radii = torch.full((n,), radius, dtype=dtype)
    radii[::3] = 0.0
    out = project_l2_ball(delta, radii)
    norms, out_norms = delta.norm(dim=-1), out.norm(dim=-1)
    inside = norms <= radii
    assert torch.equal(out[inside], delta[inside]), "rows inside their ball must be returned bit for bit"
    outside = ~inside
    assert bool((out_norms <= radii).all()), f"a projected row lies outside its ball: {out_norms - radii}"
    tol = SPHERE_RTOL[dtype]
    assert torch.allclose(out_norms[outside], radii[outside], rtol=tol, atol=tol), "outside rows land on the sphere"
    # direction kept
    keep = outside & (radii > 0)
    cos = (out[keep] * delta[keep]).sum(-1) / (out_norms[keep] * norms[keep])
    assert torch.allclose(cos, torch.ones_like(cos), atol=10 * tol), "projection must keep each row's direction"
    assert torch.equal(out[radii == 0], torch.zeros_like(out[radii == 0])), "radius 0 must give an exact zero row"
    again = project_l2_ball(out, radii)
    assert torch.equal(again, out), f"projection is not idempotent: max change {(again - out).abs().max()}"


def test_radii_by_role():
    roles = torch.tensor([TokenRole.SEPARATOR, TokenRole.INPUT_TEMPLATE, TokenRole.INPUT_TEXT,
                          TokenRole.OUTPUT_TEMPLATE, TokenRole.LABEL])
    r = token_radii(roles, eps_input=0.2, eps_format=0.1, hidden_size=512)
    s = math.sqrt(512 / RADIUS_REFERENCE_DIM)
    assert torch.allclose(r, torch.tensor([0.0, 0.1 * s, 0.2 * s, 0.1 * s, 0.0]))
