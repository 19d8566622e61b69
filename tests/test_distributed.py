"""Data-parallel training through accelerate (2 CPU processes, gloo) equals one process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cptune.app.cli import main
from tiny import save_tiny_model

# float64 compute: float32 sums in another order would differ in the last bits, and AdamW turns
# such differences in near-zero gradient entries into visible steps (it normalises by |g| + 1e-8);
# a small learning rate keeps that amplification below the tolerance (docs/scaling.md).
ARGS = ["--data", "rotten_tomatoes", "--shots", "4", "--batch-size", "4", "--steps", "5", "--lr", "0.0003",
        "--eps-input", "1.0", "--seed", "3", "--dtype", "float64"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


def test_two_processes_give_the_single_process_delta(tiny_dir, tmp_path):
    single = tmp_path / "single"
    assert main(["train", "--model", str(tiny_dir), *ARGS, "--output", str(single)]) == 0

    launcher = Path(sys.executable).with_name("accelerate")
    assert launcher.exists() or shutil.which("accelerate"), "accelerate's launcher is part of the install"
    ddp = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "cptune", "train", "--model", str(tiny_dir), *ARGS, "--output", str(ddp)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a = load_file(str(single / "cptune_state.safetensors"))["delta"]
    b = load_file(str(ddp / "cptune_state.safetensors"))["delta"]
    assert a.abs().max() > 1e-4  # training moved it
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), (a - b).abs().max()
    assert run.stdout.count("classifier saved") == 1  # only rank 0 writes and prints
