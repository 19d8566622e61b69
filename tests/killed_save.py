"""Run a save and SIGKILL it at chosen points; used by tests/test_saving.py as a separate process.

    python killed_save.py TINY_MODEL_DIR WORK_DIR SEED POINTS

``WORK_DIR/old`` holds a saved adapter (the "old" save). This process loads it, changes the delta
(seeded), and records the new context in ``WORK_DIR/new.safetensors``. A dry run into a scratch copy
lists the file-system events of the save (opening, syncing and renaming files), then POINTS seeded
random events are chosen, plus the first event and the manifest's last rename. For each point a
forked child saves the new adapter into its own copy of ``old`` (``WORK_DIR/point-K``) and kills
itself with SIGKILL just before event K. ``WORK_DIR/points.json`` lists the points, their events and
how each child ended, for the test to load every folder.

Forking after the model is loaded keeps one interpreter start for all points; torch runs with one
thread here, so the children inherit no thread pool.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import types
from pathlib import Path

import torch

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import cptune  # noqa: E402
from cptune.cpt import saving  # noqa: E402


class Tripwire:
    """Counts the save's file-system events and SIGKILLs the process just before event ``kill_at``."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.events: list[str] = []

    def hit(self, event: str) -> None:
        if len(self.events) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.events.append(event)

    def os_module(self) -> types.ModuleType:
        """``os`` with ``open``, ``fsync`` and ``replace`` passing through :meth:`hit` first."""
        proxy = types.ModuleType("os")
        proxy.__dict__.update(os.__dict__)

        def open_(path, *args, **kwargs):
            self.hit(f"open {Path(path).name}")
            return os.open(path, *args, **kwargs)

        def fsync(fd):
            self.hit("fsync")
            return os.fsync(fd)

        def replace(src, dst):
            self.hit(f"replace {Path(dst).name}")
            return os.replace(src, dst)

        proxy.open, proxy.fsync, proxy.replace = open_, fsync, replace
        return proxy


def save_new(model, folder: Path, tripwire: Tripwire) -> None:
    saving.os = tripwire.os_module()
    try:
        model.save_pretrained(folder, training_state={"step": 7}, extra_json={"cptune_extra.json": {"new": True}})
    finally:
        saving.os = os


def main(tiny_dir: str, work: str, seed: int, points: int) -> None:
    work = Path(work)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = cptune.CPTModel.from_pretrained(base, work / "old", is_trainable=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.prompt_encoder.delta.add_(torch.randn(model.prompt_encoder.delta.shape, generator=gen) * 0.05)
        model.project_()
        save_file({"context": model.context_embeddings().squeeze(0).float().contiguous()},
                  str(work / "new.safetensors"))

    dry = Tripwire(None)
    shutil.copytree(work / "old", work / "dry-run")
    save_new(model, work / "dry-run", dry)
    last_manifest = max(i for i, e in enumerate(dry.events) if e == f"replace {saving.MANIFEST_NAME}")
    chosen = sorted(set(random.Random(seed).sample(range(len(dry.events)), points)) | {0, last_manifest})

    report = []
    for k in chosen:
        folder = work / f"point-{k}"
        shutil.copytree(work / "old", folder)
        pid = os.fork()
        if pid == 0:  # the child: save until the tripwire kills it
            try:
                save_new(model, folder, Tripwire(k))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        report.append({"point": k, "event": dry.events[k], "folder": folder.name, "killed": killed})
    (work / "points.json").write_text(json.dumps({"events": dry.events, "points": report}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
