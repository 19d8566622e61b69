import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cptune.projection import RADIUS_REFERENCE_DIM, project_l2_ball, token_radii
from cptune.roles import TokenRole

RADII = st.one_of(st.just(0.0), st.floats(1e-6, 2.0))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.integers(1, 16), RADII, st.floats(0.01, 10.0), st.integers(0, 2**31 - 1))
def test_projection_properties(n, d, radius, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    radii = torch.full((n,), radius, dtype=torch.float64)
    radii[::3] = 0.0
    out = project_l2_ball(delta, radii)
    norms, out_norms = delta.norm(dim=-1), out.norm(dim=-1)
    inside = norms <= radii
    assert torch.equal(out[inside], delta[inside])  # inside: unchanged, bit for bit
    outside = ~inside
    assert torch.allclose(out_norms[outside], radii[outside], atol=1e-12)  # outside: on the sphere
    # direction kept
    keep = outside & (radii > 0)
    cos = (out[keep] * delta[keep]).sum(-1) / (out_norms[keep] * norms[keep])
    assert torch.allclose(cos, torch.ones_like(cos))
    assert torch.equal(out[radii == 0], torch.zeros_like(out[radii == 0]))
    assert torch.equal(project_l2_ball(out, radii), out) or torch.allclose(project_l2_ball(out, radii), out)


def test_radii_by_role():
    roles = torch.tensor([TokenRole.SEPARATOR, TokenRole.INPUT_TEMPLATE, TokenRole.INPUT_TEXT,
                          TokenRole.OUTPUT_TEMPLATE, TokenRole.LABEL])
    r = token_radii(roles, eps_input=0.2, eps_format=0.1, hidden_size=512)
    s = math.sqrt(512 / RADIUS_REFERENCE_DIM)
    assert torch.allclose(r, torch.tensor([0.0, 0.1 * s, 0.2 * s, 0.1 * s, 0.0]))
