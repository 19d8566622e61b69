import copy

import pytest
import torch

import cptune
from cptune.cpt.files import read_training_state
from cptune.training import NonFiniteLossError, TrainSettings, batch_indices, train
from tiny import tiny_model


def _model(context, arch="llama"):
    return cptune.get_cpt_model(tiny_model(arch), context.to_config(opt_projection_epsilon=0.5))


def test_resume_gives_the_uninterrupted_delta_bit_for_bit(context, queries, tmp_path):
    settings = TrainSettings(steps=9, batch_size=4, lr=3e-2, seed=5)
    full = _model(context)
    train(full, queries, settings, progress=False)

    first = _model(context)
    train(first, queries, settings, checkpoint_dir=tmp_path, checkpoint_every=4, progress=False)
    state = read_training_state(tmp_path)
    assert state["step"] == 9
    partial = _model(context)
    ckpt = tmp_path / "partial"

    def die_at_six(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(partial, queries, settings, checkpoint_dir=ckpt, checkpoint_every=4, progress=False,
              callback=die_at_six)
    assert read_training_state(ckpt)["step"] == 4
    resumed = _model(context)
    result = train(resumed, queries, settings, checkpoint_dir=ckpt, resume=True, progress=False)
    assert result.first_step == 4 and len(result.losses) == 5
    assert torch.equal(resumed.prompt_encoder.delta, full.prompt_encoder.delta)
    assert torch.equal(first.prompt_encoder.delta, full.prompt_encoder.delta)


def test_resume_refuses_other_settings(context, queries, tmp_path):
    train(_model(context), queries, TrainSettings(steps=2, batch_size=2), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="cannot resume"):
        train(_model(context), queries, TrainSettings(steps=3, batch_size=2), checkpoint_dir=tmp_path,
              resume=True, progress=False)


def test_same_seed_same_result_other_seed_other_result(context, queries):
    deltas = []
    for seed in (0, 0, 1):
        m = _model(context)
        train(m, queries, TrainSettings(steps=4, batch_size=2, lr=1e-2, seed=seed), progress=False)
        deltas.append(m.prompt_encoder.delta.detach().clone())
    assert torch.equal(deltas[0], deltas[1])
    assert not torch.equal(deltas[0], deltas[2])


def test_batches_cover_every_query_each_epoch():
    seen = torch.cat([batch_indices(10, 3, seed=7, step=s) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(10))


def test_non_finite_loss_stops_and_keeps_last_good_state(context, queries, tmp_path):
    model = _model(context)
    train(model, queries, TrainSettings(steps=2, batch_size=2, lr=1e-2), progress=False)
    good = model.prompt_encoder.delta.detach().clone()
    with torch.no_grad():  # poison a frozen base weight so the next forward is NaN
        model.base_model.get_output_embeddings().weight[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="nan"):
        train(model, queries, TrainSettings(steps=3, batch_size=2, lr=1e-2), checkpoint_dir=tmp_path,
              progress=False)
    assert torch.equal(model.prompt_encoder.delta.detach(), good)
    assert read_training_state(tmp_path)["step"] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(lr=0), "lr"), (dict(lr=float("nan")), "lr"), (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"),
     (dict(schedule="exp"), "schedule"), (dict(steps=None, epochs=0), "epochs"), (dict(weight_decay=-1), "weight")],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainSettings(**kwargs)


def test_base_model_frozen_and_no_grad(context, queries):
    model = _model(context)
    before = copy.deepcopy(model.base_model.state_dict())
    train(model, queries, TrainSettings(steps=2), progress=False)
    assert all(p.grad is None and not p.requires_grad for p in model.base_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.base_model.state_dict().items())
