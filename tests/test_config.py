import json

import peft
import pytest
from packaging.version import Version

from cptune import CPTConfig
from cptune.cpt.config import PEFT_FORMAT_VERSION

PEFT_CPT_FILLS_VERSION = Version("0.20")
"""From 0.20 peft.CPTConfig runs PeftConfig's __post_init__, which fills peft_version; 0.18-0.19 leave it None."""


def test_defaults_and_json_match_peft():
    ours = CPTConfig().to_dict()
    theirs = json.loads(json.dumps(peft.CPTConfig(task_type="CAUSAL_LM").to_dict(), default=str))
    theirs["peft_type"] = "CPT"
    # peft_version names the writer's release: cptune records the PEFT format it follows, PEFT its installed release
    assert ours.pop("peft_version") == PEFT_FORMAT_VERSION
    installed = Version(peft.__version__)
    assert theirs.pop("peft_version") == (peft.__version__ if installed >= PEFT_CPT_FILLS_VERSION else None)
    assert ours == theirs


def test_every_peft_field_exists_with_same_default():
    ours = CPTConfig().to_dict()
    theirs = peft.CPTConfig(task_type="CAUSAL_LM").to_dict()
    assert set(ours) == set(theirs)


def test_round_trip_through_peft_json():
    cfg = CPTConfig(
        cpt_token_ids=[5, 6, 7, 8, 1],
        cpt_tokens_type_mask=[1, 2, 3, 4, 0],
        opt_weighted_loss_type="decay",
        opt_loss_decay_factor=0.95,
        opt_projection_epsilon=0.2,
    )
    text = cfg.to_json_string()
    theirs = peft.CPTConfig.from_peft_type(**json.loads(text))
    back = CPTConfig.from_dict(json.loads(json.dumps(theirs.to_dict(), default=str)))
    assert back == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(task_type="SEQ_CLS"), "task_type"),
        (dict(opt_weighted_loss_type="exp"), "opt_weighted_loss_type"),
        (dict(opt_loss_decay_factor=0.0), "opt_loss_decay_factor"),
        (dict(opt_loss_decay_factor=1.5), "opt_loss_decay_factor"),
        (dict(opt_loss_decay_factor=float("nan")), "opt_loss_decay_factor"),
        (dict(opt_projection_epsilon=-0.1), "opt_projection_epsilon"),
        (dict(opt_projection_format_epsilon=-1), "opt_projection_format_epsilon"),
        (dict(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1]), "same length"),
        (dict(cpt_token_ids=[1, -2], cpt_tokens_type_mask=[1, 4]), "cpt_token_ids"),
        (dict(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1, 4], cpt_mask=[1, 2]), "cpt_mask"),
        (dict(cpt_token_ids=[1, 2, 3], cpt_tokens_type_mask=[5, 6, 8]), "numbered from 0"),
        (dict(cpt_token_ids=[1, 2, 3, 4], cpt_tokens_type_mask=[1, 4, 9, 12]), "order of demonstrations"),
        (dict(cpt_token_ids=[1, 2, 3, 4, 5, 6], cpt_tokens_type_mask=[1, 4, 5, 8, 1, 4]), "order of demonstrations"),
        (dict(cpt_token_ids=[1, 2, 3], cpt_tokens_type_mask=[1, 2, 3]), "no label"),
        (dict(cpt_token_ids=[1, 2, 3, 4], cpt_tokens_type_mask=[1, 4, 5, 6]), "demonstration 1 has no label"),
        (dict(cpt_token_ids=[1.5]), "cpt_token_ids"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CPTConfig(**kwargs)


def test_separators_anywhere_and_placeholder_accepted():
    CPTConfig(cpt_token_ids=[9, 1, 2, 3, 9, 4, 9], cpt_tokens_type_mask=[0, 1, 2, 4, 0, 8, 0])
    assert CPTConfig().num_examples == 1


def test_unknown_keys_are_ignored_with_warning():
    with pytest.warns(UserWarning, match="future_field"):
        cfg = CPTConfig.from_dict({"future_field": 1, "peft_type": "CPT", "task_type": "CAUSAL_LM"})
    assert cfg.cpt_token_ids == [0]
