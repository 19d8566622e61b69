"""The six few-shot methods behind one interface (cptune.methods, cptune.methods.peft), on tiny models."""

import pytest
import torch

from conftest import DEMOS, LABEL_WORDS, QUERIES, TEMPLATE
from cptune.methods import METHODS, FitInfo, Method, MethodSettings, make_method
from tiny import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TEXTS = [text for text, _ in QUERIES]
GOLD = [label for _, label in QUERIES]
TRAINED = ("cpt", "pt", "ipt", "lora")
# Large steps so a few full-batch steps (4 shots, batch 4) clearly lower each method's loss on a random tiny model.
FAST = MethodSettings(steps=12, batch_size=4, cpt_lr=0.1, eps_input=5.0, eps_format=5.0, pt_lr=0.03, pt_tokens=4,
                      lora_lr=0.02, lora_r=4, lora_alpha=8)


def _reference_scores(method, scoring_model, tok, texts):
    """``(len(texts), C)`` label log-likelihoods from one plain forward per (text, label) pair.

    Each sequence is the method's context embeddings (if any), the query up to its output template
    and the label's tokens; a label's score is the sum of the log-softmax at the positions before
    its tokens. No cache, no batching, no padding: what ``scores()`` must reproduce.
    """
    from cptune.scoring import query_token_ids
    from cptune.text.template import label_token_ids

    context = method.context_embeddings()
    n = 0 if context is None else context.shape[1]
    label_ids = label_token_ids(TEMPLATE, tok, LABEL_WORDS)
    embed = scoring_model.get_input_embeddings()
    out = torch.zeros(len(texts), len(LABEL_WORDS))
    with torch.no_grad():
        for i, query in enumerate(query_token_ids(texts, TEMPLATE, tok, add_bos=context is None)):
            for j, label in enumerate(LABEL_WORDS):
                target = label_ids[label]
                x = embed(torch.tensor(query + target))[None]  # (1, T, d)
                if context is not None:
                    x = torch.cat([context.to(x.dtype), x], dim=1)  # (1, N + T, d)
                logp = torch.log_softmax(scoring_model(inputs_embeds=x).logits[0].float(), dim=-1)
                before = n + len(query) - 1 + torch.arange(len(target))  # positions predicting the label
                out[i, j] = logp[before, torch.tensor(target)].sum()
    return out


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()])


def _assert_untouched(model, snapshot):
    state, flags, modes = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize(
    "arch,name", [("llama", name) for name in METHODS] + [("gpt2", name) for name in ("pt", "ipt", "lora")]
)
def test_fit_scores_and_base_model_untouched(arch, name, tok):
    base = tiny_model(arch)
    base.requires_grad_(True)  # a caller's trainable model: flags and mode must survive the fit
    snapshot = _snapshot(base)
    rng = torch.get_rng_state()
    method = make_method(name, base, tok, TEMPLATE, LABEL_WORDS, FAST)
    info = method.fit(DEMOS)
    scores = method.scores(TEXTS)
    assert isinstance(method, Method) and isinstance(info, FitInfo)
    assert scores.shape == (len(TEXTS), len(LABEL_WORDS)) and scores.dtype == torch.float32
    scoring_model = method.peft_model.get_base_model() if name == "lora" else base  # LoRA scores its own copy
    expected = _reference_scores(method, scoring_model, tok, TEXTS)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{arch}/{name}: scores() != plain-forward log-likelihoods\n{m}")
    assert method.labels == list(LABEL_WORDS)
    if name in TRAINED:
        assert len(info.losses) == FAST.steps and info.trainable_parameters > 0
        assert info.losses[-1] < info.losses[0], info.losses
    _assert_untouched(base, snapshot)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name", ["zero-shot", "icl"])
def test_untrained_methods_need_no_training(name, tok):
    """Fitting an untrained method runs no forward of the model; scoring runs one per query batch
    (plus one to encode the context), each keeping one position per text, so the texts are scored once."""
    from cptune.cpt.engine import cache_name, layout_for

    base = tiny_model()
    layout_for(base)  # the engine's one-time layout check runs its own forwards; not counted here
    forwards = []
    base.register_forward_hook(lambda module, args, kwargs, output: forwards.append(kwargs), with_kwargs=True)
    method = make_method(name, base, tok, TEMPLATE, LABEL_WORDS, FAST)
    info = method.fit(DEMOS)
    assert info.losses == [] and info.trainable_parameters == 0, info
    assert forwards == [], f"{name}: fit() ran {len(forwards)} forwards; it has nothing to train"
    texts = TEXTS * 3  # 18 texts: 3 batches of at most 8
    method.scores(texts)
    batches = -(-len(texts) // FAST.score_batch_size)
    context_forwards = [kw for kw in forwards if kw.get(cache_name(base)) is None and kw.get("use_cache")]
    query_forwards = [kw for kw in forwards if not any(kw is c for c in context_forwards)]

    def kept(kw) -> int:  # positions whose logits the forward returns: one per text (single-token labels)
        keep = kw["logits_to_keep"]
        return int(keep.sum()) if keep.dtype == torch.bool else keep.numel()

    assert [kept(kw) for kw in query_forwards] == [8, 8, 2], (name, [kept(kw) for kw in query_forwards])
    assert len(query_forwards) == batches
    expected = 1 if name == "icl" else 0
    assert len(context_forwards) == expected, f"{name}: the context was encoded {len(context_forwards)} times"


@pytest.mark.parametrize("name", TRAINED)
def test_same_seed_same_scores(name, tok):
    base = tiny_model()
    runs = []
    for _ in range(2):
        method = make_method(name, base, tok, TEMPLATE, LABEL_WORDS, FAST)
        runs.append((method.fit(DEMOS).losses, method.scores(TEXTS)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_lora_seed_changes_its_initialisation(tok):
    base = tiny_model()
    scores = [make_method("lora", base, tok, TEMPLATE, LABEL_WORDS, FAST.replace(seed=seed)) for seed in (0, 1)]
    for method in scores:
        method.fit(DEMOS)
    assert not torch.equal(scores[0].scores(TEXTS), scores[1].scores(TEXTS))


def test_cpt_before_training_scores_as_icl_and_lora_as_zero_shot(tok):
    base = tiny_model()
    icl = make_method("icl", base, tok, TEMPLATE, LABEL_WORDS, FAST)
    icl.fit(DEMOS)
    cpt = make_method("cpt", base, tok, TEMPLATE, LABEL_WORDS, FAST)
    cpt.prepare(DEMOS)
    assert torch.equal(cpt.context_embeddings(), icl.context_embeddings())
    assert torch.equal(cpt.scores(TEXTS), icl.scores(TEXTS))
    cpt.fit(DEMOS)
    assert not torch.equal(cpt.scores(TEXTS), icl.scores(TEXTS))

    zero = make_method("zero-shot", base, tok, TEMPLATE, LABEL_WORDS, FAST)
    lora = make_method("lora", base, tok, TEMPLATE, LABEL_WORDS, FAST)
    lora.prepare(DEMOS)
    assert lora.context_embeddings() is None
    assert torch.equal(lora.scores(TEXTS), zero.scores(TEXTS))


def test_ipt_context_is_soft_prompt_then_demonstrations(tok):
    base = tiny_model()
    icl = make_method("icl", base, tok, TEMPLATE, LABEL_WORDS, FAST)
    icl.fit(DEMOS)
    pt = make_method("pt", base, tok, TEMPLATE, LABEL_WORDS, FAST)
    ipt = make_method("ipt", base, tok, TEMPLATE, LABEL_WORDS, FAST)
    pt.prepare(DEMOS)
    ipt.prepare(DEMOS)
    n = FAST.pt_tokens
    # Same initial prompt (the init text's embeddings); ipt appends the plain demonstration embeddings.
    assert torch.equal(ipt.context_embeddings()[:, :n], pt.context_embeddings())
    assert torch.equal(ipt.context_embeddings()[:, n:], icl.context_embeddings())
    words = tok(pt.init_text(), add_special_tokens=False)["input_ids"]
    expected = base.get_input_embeddings()(torch.tensor((words * n)[:n]))
    assert torch.equal(pt.context_embeddings()[0], expected)
    pt.fit(DEMOS)
    ipt.fit(DEMOS)
    assert ipt.context_embeddings().shape[1] == n + icl.context_embeddings().shape[1]
    assert not torch.allclose(ipt.scores(TEXTS), pt.scores(TEXTS))


def test_label_loss_is_gold_label_nll(tok):
    method = make_method("icl", tiny_model(), tok, TEMPLATE, LABEL_WORDS, FAST)
    method.fit(DEMOS)
    scores = method.scores(TEXTS)
    gold = torch.tensor([list(LABEL_WORDS).index(label) for label in GOLD])
    expected = -scores[torch.arange(len(TEXTS)), gold].mean()
    assert method.label_loss(TEXTS, GOLD) == pytest.approx(float(expected))
    assert method.label_loss(TEXTS, GOLD, scores=scores) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="shape"):
        method.label_loss(TEXTS, GOLD, scores=scores[:2])
    with pytest.raises(ValueError, match="'meh'"):
        method.label_loss(TEXTS[:1], ["meh"])
    with pytest.raises(ValueError, match="same"):
        method.label_loss(TEXTS, GOLD[:2])


def test_scores_need_fit_except_zero_shot(tok):
    base = tiny_model()
    with pytest.raises(RuntimeError, match="fit"):
        make_method("icl", base, tok, TEMPLATE, LABEL_WORDS, FAST).scores(TEXTS)
    zero = make_method("zero-shot", base, tok, TEMPLATE, LABEL_WORDS)
    assert zero.scores(TEXTS).shape == (len(TEXTS), 2)
    assert zero.scores([]).shape == (0, 2)


def test_unknown_method_lists_all_six(tok):
    with pytest.raises(ValueError, match="'bitfit'") as err:
        make_method("bitfit", tiny_model(), tok, TEMPLATE, LABEL_WORDS)
    assert all(name in str(err.value) for name in METHODS)


@pytest.mark.parametrize(
    "field,value",
    [("steps", 0), ("steps", 2.5), ("batch_size", 0), ("seed", -1), ("cpt_lr", 0.0), ("pt_lr", float("nan")),
     ("lora_lr", -1e-3), ("eps_input", -0.1), ("eps_format", float("inf")), ("decay", 0.0), ("decay", 1.5),
     ("pt_tokens", 0), ("pt_init_text", "  "), ("lora_r", 0), ("lora_alpha", 0), ("length_normalize", "yes"),
     ("score_batch_size", 0), ("steps", True)],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MethodSettings(**{field: value})


def test_settings_replace_and_bad_inputs(tok):
    assert MethodSettings().replace(steps=3).steps == 3
    with pytest.raises(ValueError, match="'stepz'"):
        MethodSettings().replace(stepz=3)
    base = tiny_model()
    with pytest.raises(ValueError, match="MethodSettings"):
        make_method("icl", base, tok, TEMPLATE, LABEL_WORDS, settings={"steps": 3})
    with pytest.raises(ValueError, match="at least two"):
        make_method("icl", base, tok, TEMPLATE, {"pos": "positive"})
    method = make_method("cpt", base, tok, TEMPLATE, LABEL_WORDS, FAST)
    with pytest.raises(ValueError, match="empty"):
        method.fit([])
    with pytest.raises(ValueError, match="'meh'"):
        method.fit([("fine", "meh")])


@pytest.mark.parametrize("name", ["pt", "ipt", "lora"])
def test_first_training_loss_is_the_scored_label_nll(name, tok):
    """Training and scoring see the same sequence: step 0's loss (full batch, untrained state) equals the
    gold-label NLL that scores() gives after prepare(), per label token (labels only, nothing else)."""
    from cptune.text.template import label_token_ids

    base = tiny_model()
    method = make_method(name, base, tok, TEMPLATE, LABEL_WORDS, FAST)
    method.prepare(DEMOS)
    texts, labels = [t for t, _ in DEMOS], [label for _, label in DEMOS]
    lengths = label_token_ids(TEMPLATE, tok, LABEL_WORDS)
    total_nll = method.label_loss(texts, labels) * len(texts)
    per_token = total_nll / sum(len(lengths[label]) for label in labels)
    assert method.fit(DEMOS).losses[0] == pytest.approx(per_token, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["pt", "ipt", "lora"])
def test_fast_label_loss_matches_peft_forward(arch, name, tok):
    """The shared-prefix, label-positions-only loss equals PEFT's own forward loss, gradients included."""
    from cptune.methods import label_batch
    from cptune.methods.peft import label_token_loss

    method = make_method(name, tiny_model(arch), tok, TEMPLATE, LABEL_WORDS, FAST)
    method.prepare(DEMOS)
    peft_model = method.peft_model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:  # move off the initial state (LoRA's B is zero there)
            p.add_(0.05 * torch.randn_like(p))
    rows = torch.tensor([2, 0, 3])
    demo_ids = getattr(method, "demo_ids", None)
    reference = peft_model(**label_batch(method._queries, rows, "cpu", prefix_ids=demo_ids), use_cache=False).loss
    expected = torch.autograd.grad(reference, params)
    if name == "lora":
        loss = label_token_loss(peft_model.get_base_model(), label_batch(method._queries, rows, "cpu"))
    else:
        prefix = method.prefix_embeddings(peft_model.get_prompt(batch_size=1))
        loss = label_token_loss(peft_model.get_base_model(), label_batch(method._queries, rows, "cpu"), prefix)
    grads = torch.autograd.grad(loss, params)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
