import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cptune.cpt import embedding as embedding_module
from cptune.cpt.embedding import embedding_row_norms
from cptune.cpt.projection import (
    RADIUS_MODES,
    RADIUS_REFERENCE_DIM,
    REFERENCE_EMBEDDING_SCALE,
    embedding_scale,
    project_l2_ball,
    relative_epsilon,
    token_radii,
)
from cptune.cpt.roles import TokenRole
from cptune.recipe import CPTRecipe, model_embedding_scale
from tiny import tiny_model

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


# -- relative radii ------------------------------------------------------------------------------

POSITIVE = st.floats(1e-3, 1e3)


@settings(max_examples=60, deadline=None)
@given(RADII, POSITIVE, POSITIVE, st.sampled_from([32, 576, 640, 2048]))
def test_relative_radius_is_the_absolute_radius_times_the_scale_ratio(eps, scale, reference, d):
    # r_i = eps * (s / s_ref) * sqrt(d / 2048): the radius PEFT's formula gives from the recorded epsilon
    roles = torch.tensor([TokenRole.INPUT_TEXT, TokenRole.INPUT_TEMPLATE, TokenRole.LABEL])
    recorded = relative_epsilon(eps, scale, reference)
    radii = token_radii(roles, recorded, recorded / 2, d).double()
    want = eps * (scale / reference) * math.sqrt(d / RADIUS_REFERENCE_DIM)
    assert torch.allclose(radii, torch.tensor([want, want / 2, 0.0], dtype=torch.float64), rtol=1e-6)
    # at the reference scale the relative radius is the absolute one, exactly
    assert relative_epsilon(eps, reference, reference) == eps
    # twice the embedding scale, twice the radius
    assert math.isclose(relative_epsilon(eps, 2 * scale, reference), 2 * recorded, rel_tol=1e-12)


def test_smollm2_reference_scale_gives_todays_radii():
    assert relative_epsilon(0.2, REFERENCE_EMBEDDING_SCALE) == 0.2
    absolute = CPTRecipe()
    relative = CPTRecipe(radius="relative")
    assert relative.config_fields(REFERENCE_EMBEDDING_SCALE) == absolute.config_fields()
    assert relative.config_fields(9 * REFERENCE_EMBEDDING_SCALE)["opt_projection_epsilon"] == pytest.approx(1.8)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_relative_epsilon_refuses_a_scale_that_is_not_positive(scale):
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        relative_epsilon(0.2, scale)


def test_recipe_radius_modes():
    with pytest.raises(ValueError, match="radius='wide' must be one of: absolute, relative"):
        CPTRecipe(radius="wide")
    with pytest.raises(ValueError, match="needs the model's embedding scale"):
        CPTRecipe(radius="relative").config_fields()
    from cptune.app.demo import RADIUS_CHOICES

    assert RADIUS_CHOICES == RADIUS_MODES  # the command line's copy (it imports no torch)


def test_embedding_scale_is_the_median_row_norm_and_ignores_a_few_outliers():
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert embedding_scale(norms) == 3.0
    assert embedding_scale(torch.tensor([1.0, 2.0, 3.0, 4.0])) == 2.0  # even count: the lower middle row
    assert embedding_scale(torch.cat([norms, torch.tensor([1e6])])) == 3.0  # one huge row does not move it
    with pytest.raises(ValueError, match="at least one"):
        embedding_scale(torch.zeros(0))
    with pytest.raises(ValueError, match="not finite"):
        embedding_scale(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_row_norms_are_those_the_embedding_module_outputs(arch, monkeypatch):
    model = tiny_model(arch)
    module = model.get_input_embeddings()
    monkeypatch.setattr(embedding_module, "ROW_NORM_CHUNK", 7)  # several chunks, the last one short
    norms = embedding_row_norms(module)
    weight_norms = torch.linalg.vector_norm(module.weight.float(), dim=-1)
    # Gemma multiplies its embeddings by sqrt(d) inside the module; the others output the rows as they are
    factor = math.sqrt(model.config.hidden_size) if arch == "gemma3_text" else 1.0
    assert norms.shape == (module.weight.shape[0],)
    assert torch.allclose(norms, weight_norms * factor, rtol=1e-5)
    assert model_embedding_scale(model) == embedding_scale(norms)
