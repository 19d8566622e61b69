"""Device and dtype selection: "auto" picks the machine's best, explicit choices are checked, the CLI says where."""

import numpy as np
import pytest
import torch

from cptune import CPTClassifier, TrainSettings
from cptune.app.cli import main
from cptune.models import load_model, placement, resolve_device, resolve_dtype

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA or HAS_MPS, reason="this machine has a GPU; 'auto' picks it")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")


@cpu_only
def test_auto_is_the_cpu_and_float32_without_a_gpu(tiny_dir):
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_dtype("auto") is torch.float32
    model, _ = load_model(tiny_dir)  # the defaults are "auto"
    assert placement(model) == "cpu, float32"


def test_explicit_choices_are_kept():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32  # bfloat16 is a GPU choice only


@pytest.mark.parametrize("device, message", [
    ("tpu", "accepted: auto, cpu, cuda"),
    ("nonsense!", "unknown device 'nonsense!'"),
    pytest.param("cuda", "no CUDA GPU", marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA is here")),
    pytest.param("cuda:64", "CUDA device", marks=needs_cuda),
])
def test_bad_devices_are_named(device, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(device)


def test_bad_dtype_lists_auto():
    with pytest.raises(ValueError, match="accepted: auto, float32"):
        resolve_dtype("half8")


def test_device_and_device_map_exclude_each_other(tiny_dir):
    with pytest.raises(ValueError, match="not both"):
        load_model(tiny_dir, device="cpu", device_map="auto")
    model, _ = load_model(tiny_dir, device="auto", device_map="auto")  # "auto" device defers to the map
    auto_dtype = str(resolve_dtype("auto")).removeprefix("torch.")  # bfloat16 on a GPU, float32 on a CPU
    assert placement(model).endswith(auto_dtype)


def test_classifier_takes_device_and_dtype(tiny_dir):
    clf = CPTClassifier(str(tiny_dir), labels={"pos": "positive", "neg": "negative"}, device="cpu", dtype="bfloat16",
                        train=TrainSettings(steps=1, batch_size=2))
    clf.fit(["fun", "dull"], ["pos", "neg"])
    assert clf.placement_ == "cpu, bfloat16"
    assert clf.cpt_model_.prompt_encoder.delta.dtype == torch.float32  # the context stays float32


@cpu_only
def test_cli_refuses_cuda_without_a_gpu_in_one_line(tiny_dir, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_dir), "--data", "rotten_tomatoes", "--shots", "2", "--device", "cuda",
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("cptune: error:") and "'cuda'" in err[-1] and "no CUDA GPU" in err[-1]
    assert not (tmp_path / "o").exists()


def test_cli_says_once_where_the_model_runs(tiny_dir, tmp_path, capsys):
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", "rotten_tomatoes", "--shots", "2", "--steps", "1",
                 "--device", "cpu", "--dtype", "float32", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count(f"cptune: model {tiny_dir} on cpu, float32") == 1, err
    assert main(["predict", str(out), "fun", "--device", "cpu", "--dtype", "float64"]) == 0
    assert capsys.readouterr().err.count("on cpu, float64") == 1


@needs_cuda
def test_cuda_classifier_matches_the_cpu_one(tiny_dir):
    texts, labels = ["fun", "dull", "a joy", "a bore"], ["pos", "neg", "pos", "neg"]
    probs = {}
    for device in ("cpu", "cuda"):
        clf = CPTClassifier(str(tiny_dir), labels={"pos": "positive", "neg": "negative"}, device=device,
                            dtype="float32", train=TrainSettings(steps=3, batch_size=2, lr=1e-2, seed=1))
        probs[device] = clf.fit(texts, labels).predict_proba(texts)
        assert clf.placement_.startswith(device)
    np.testing.assert_allclose(probs["cuda"], probs["cpu"], atol=1e-4)
    auto = CPTClassifier(str(tiny_dir), labels={"pos": "positive", "neg": "negative"})
    auto.fit(texts, labels)
    want = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert auto.placement_ == f"cuda:0, {want}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_data_parallel_step_reduces_only_tensors_on_the_model_device(context, queries, monkeypatch, device):
    """NCCL, the backend on GPUs, reduces no CPU tensors: every tensor handed to all_reduce sits on the
    model's device. Two processes are simulated (this one as rank 0 with a row, as rank 1 without)."""
    import cptune
    import cptune.training as training
    from tiny import tiny_model

    reduced = []

    def all_reduce_sum(tensor):  # the other process contributes nothing
        reduced.append(tensor.device)
        return tensor

    monkeypatch.setattr(training, "all_reduce_sum", all_reduce_sum)
    for rank, batch_size in ((0, 2), (1, 1)):  # rank 1 of batch 1 has no row: the empty branch
        monkeypatch.setattr(training, "process_group", lambda rank=rank: (rank, 2))
        model = cptune.get_cpt_model(tiny_model().to(device), context.to_config(opt_projection_epsilon=0.5))
        result = training.train(model, queries, TrainSettings(steps=2, batch_size=batch_size), progress=False)
        assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert len(reduced) == 12 and set(reduced) == {torch.empty(0, device=device).device}  # cuda:0, not cuda
