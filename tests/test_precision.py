"""Half precisions (bf16 on CPU) and gradient checkpointing: the delta and its projection stay float32."""

import copy

import pytest
import torch

import cptune
from cptune.scoring import score_texts
from cptune.training import TrainSettings, train
from tiny import tiny_model

BF16_RTOL = 2**-8
"""bfloat16's unit roundoff (8 significant bits): how far a bf16 score may be from the float32 one."""


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_bfloat16_base_model_trains_a_float32_delta(arch, context, queries, tok, tmp_path):
    base = tiny_model(arch, dtype=torch.bfloat16)
    model = cptune.get_cpt_model(base, context.to_config(opt_projection_epsilon=0.5))
    enc = model.prompt_encoder
    assert enc.delta.dtype == torch.float32 and enc.base.dtype == torch.float32
    assert model.context_embeddings().dtype == torch.bfloat16  # only the sum is cast
    out = model(**queries, return_logits=False)
    assert out.loss.dtype == torch.float32  # the loss runs in float32 for half precisions
    result = train(model, queries, TrainSettings(steps=8, batch_size=3, lr=5e-2), progress=False)
    assert result.losses[-1] < result.losses[0]
    assert enc.delta.dtype == torch.float32 and enc.is_feasible()
    from conftest import LABEL_WORDS, TEMPLATE

    # Reference: the same (bf16-rounded) weights and the float32 context, scored in float32.
    reference = copy.deepcopy(base).float()
    with torch.no_grad():
        scores = score_texts(base, tok, TEMPLATE, LABEL_WORDS, ["fun", "dull"], model.context_embeddings())
        expected = score_texts(reference, tok, TEMPLATE, LABEL_WORDS, ["fun", "dull"], enc()[None])
    torch.testing.assert_close(scores, expected, rtol=BF16_RTOL, atol=0.0,
                               msg=lambda m: f"{arch}: bf16 scores too far from float32 ones\n{m}")
    model.save_pretrained(tmp_path)
    loaded = cptune.CPTModel.from_pretrained(tiny_model(arch, dtype=torch.bfloat16), tmp_path)
    assert torch.equal(loaded.prompt_encoder.delta, enc.delta.detach())


def test_bfloat16_shared_prefix_matches_plain_layout(context, queries):
    base = tiny_model("llama", dtype=torch.bfloat16)
    losses = []
    for mode in ("never", "always"):
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(), prefix_sharing=mode)
        losses.append(model(**queries).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)  # bf16 rounding differs with the layout


# transformers 5.23+ warns FutureWarning for the old gradient_checkpointing_enable name; 5.21-5.22 lack the new one
@pytest.mark.filterwarnings("error::FutureWarning")
def test_gradient_checkpointing_gives_the_same_loss_and_gradient(context, queries):
    base = tiny_model("llama", dtype=torch.float64)
    deltas = []
    for checkpointing in (False, True):
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(opt_projection_epsilon=0.5))
        on = []  # per step: was some layer checkpointing while training ran

        def seen(step, loss, model=model, on=on):
            on.append(any(getattr(m, "gradient_checkpointing", False) for m in model.base_model.modules()))

        result = train(model, queries, TrainSettings(steps=3, batch_size=3, lr=1e-3,
                                                     gradient_checkpointing=checkpointing), progress=False,
                       callback=seen)
        deltas.append((result.losses, model.prompt_encoder.delta.detach().clone()))
        assert on == [checkpointing] * 3
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.base_model.modules())
    (l0, d0), (l1, d1) = deltas
    assert l0 == pytest.approx(l1, rel=1e-9)
    assert torch.allclose(d0, d1, atol=1e-7)


def test_device_map_auto_keeps_the_context_on_the_embedding_device(context, queries, tmp_path):
    from cptune.models import load_model
    from tiny import tiny_tokenizer

    tiny_model("qwen2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    base, _ = load_model(tmp_path, device_map="auto")
    model = cptune.get_cpt_model(base, context.to_config())
    assert model.prompt_encoder.delta.device == base.get_input_embeddings().weight.device
    plain = cptune.get_cpt_model(tiny_model("qwen2"), context.to_config())  # the same weights, no device map
    with torch.no_grad():
        loss, expected = model(**queries).loss, plain(**queries).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6), "device_map='auto' changed the loss"
    with pytest.raises(ValueError, match="not both"):
        load_model(tmp_path, device="cpu", device_map="auto")
