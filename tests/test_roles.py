import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cptune.cpt.roles import NO_EXAMPLE, TokenRole, from_peft_codes, to_peft_codes


@st.composite
def roles_and_index(draw):
    n = draw(st.integers(1, 60))
    roles = draw(st.lists(st.sampled_from(list(TokenRole)), min_size=n, max_size=n))
    index = [NO_EXAMPLE if r == TokenRole.SEPARATOR else draw(st.integers(0, 50)) for r in roles]
    return torch.tensor([int(r) for r in roles]), torch.tensor(index)


@given(roles_and_index())
def test_peft_codes_round_trip_is_lossless(pair):
    roles, index = pair
    codes = to_peft_codes(roles, index)
    back_roles, back_index = from_peft_codes(codes)
    assert torch.equal(back_roles, roles)
    assert torch.equal(back_index, index)
    # PEFT's own reading of a code: role = code mod 4 (0 -> label), example = (code - 1) div 4.
    member = codes > 0
    assert torch.equal(codes[member] % 4, roles[member] % 4)
    assert torch.equal((codes[member] - 1) // 4, index[member])


@given(st.lists(st.integers(0, 400), min_size=1, max_size=80))
def test_codes_round_trip_from_peft_side(codes):
    codes = torch.tensor(codes)
    assert torch.equal(to_peft_codes(*from_peft_codes(codes)), codes)


def test_known_codes():
    roles, index = from_peft_codes(torch.tensor([0, 1, 2, 3, 4, 5, 8, 0]))
    assert roles.tolist() == [0, 1, 2, 3, 4, 1, 4, 0]
    assert index.tolist() == [-1, 0, 0, 0, 0, 1, 1, -1]


def test_negative_code_is_rejected():
    with pytest.raises(ValueError, match="negative"):
        from_peft_codes(torch.tensor([1, -3]))


def test_member_without_example_is_rejected():
    with pytest.raises(ValueError, match="example index"):
        to_peft_codes(torch.tensor([TokenRole.INPUT_TEXT]), torch.tensor([NO_EXAMPLE]))
