"""Training checkpoints in the artifact store: saved every N steps, resumed from the newest that verifies.

A checkpoint is an output of its own, committed with the store's protocol (files under an attempt
folder, the manifest last) under the job's key::

    <job key>/_checkpoints/step-00000500/_manifest.json
                                        /<attempt>/lora.safetensors       trainable LoRA tensors, by name
                                        /<attempt>/optimizer.safetensors  the optimizer state's tensors
                                        /<attempt>/rng.safetensors        torch generator states
                                        /<attempt>/state.json             everything else (below)

so one killed mid-write has no manifest and is never taken for complete. ``state.json`` holds the
step, the loss history so far, the training seconds so far, the optimizer state's non-tensor part
(its parameter groups), Python's and NumPy's RNG states, a format version and the train settings
that determine the output. No pickle anywhere: tensors are safetensors, the rest JSON.

Reading one fetches it with ``fetch_dir`` (every file checked against the manifest's SHA-256); the
newest checkpoint that fails (a damaged file, a corrupt manifest, a format or settings mismatch) is
skipped, with a warning naming it, for the one before. After each save the checkpoints but the newest
``keep`` are deleted; the train phase deletes the whole ``_checkpoints/`` prefix once its output is
committed (a kill in between leaves garbage only: the job is then committed and skipped).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_core import distributed
from selma_core.errors import InputError
from selma_core.faults import fault_point
from selma_core.storage.base import MANIFEST

FORMAT_VERSION = 1
CHECKPOINTS = "_checkpoints"
TENSOR_FILES = ("lora", "optimizer", "rng")
STATE_FILE = "state.json"
_STEP_FOLDER = re.compile(r"step-(\d{8})/(.+)")


@dataclass
class TrainState:
    """One checkpoint in memory: tensors by file (``lora``, ``optimizer``, ``rng``) and JSON ``meta``."""

    step: int
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def write_state(state: TrainState, folder: Path) -> None:
    from safetensors.torch import save_file

    for name in TENSOR_FILES:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.tensors.get(name, {}).items()}
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / STATE_FILE).write_text(json.dumps({**state.meta, "step": state.step}, indent=1))


def read_state(folder: Path) -> TrainState:
    """A checkpoint's files read back; a missing or unreadable file is a ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for name in TENSOR_FILES:
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"no {path.name}")
        try:
            tensors[name] = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path.name}: {e}") from e
    if not (folder / STATE_FILE).is_file():
        raise ValueError(f"no {STATE_FILE}")
    meta = json.loads((folder / STATE_FILE).read_text())
    if not isinstance(meta, dict) or type(meta.get("step")) is not int:
        raise ValueError(f"{STATE_FILE}: expected an object with an integer 'step'")
    return TrainState(meta.pop("step"), tensors, meta)


# -- optimizer and RNG states as tensors + JSON ---------------------------------------------------


def split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """``optimizer.state_dict()`` as (tensors named ``state.<param>.<name>``, the JSON rest)."""
    import torch

    tensors, state = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                state.setdefault(str(index), {})[name] = value
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def join_optimizer_state(tensors: dict, meta: dict) -> dict:
    """The inverse of ``split_optimizer_state`` (tuples, which JSON makes lists, are tuples again)."""
    state: dict[int, dict] = {int(i): dict(entries) for i, entries in meta["state"].items()}
    for key, value in tensors.items():
        prefix, index, name = key.split(".", 2)
        if prefix != "state":
            raise ValueError(f"optimizer tensor {key!r}: expected state.<index>.<name>")
        state.setdefault(int(index), {})[name] = value
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def capture_rng(generator, device: str) -> tuple[dict, dict]:
    """Every random state training may draw from: the trainer's generator, torch's default CPU (and
    current CUDA) generator as tensors; Python's and NumPy's global states as JSON."""
    import numpy as np
    import torch

    tensors = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(words), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(generator, device: str, tensors: dict, meta: dict) -> None:
    import numpy as np
    import torch

    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    if device.startswith("cuda") and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, words, gauss = meta["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- checkpoints in the store ---------------------------------------------------------------------

# What makes a checkpoint unusable (skipped for an older one), as opposed to a failure worth a retry.
_UNUSABLE = (InputError, ValueError, KeyError, TypeError, IndexError)


class CheckpointStore:
    """The checkpoints of one job (``<job key>/_checkpoints/``)."""

    def __init__(self, store, job_key: str, scratch_dir: str | Path, keep: int = 2) -> None:
        self.store, self.scratch_dir, self.keep = store, Path(scratch_dir), keep
        self.prefix = f"{job_key}/{CHECKPOINTS}"

    def key(self, step: int) -> str:
        return f"{self.prefix}/step-{step:08d}"

    def _folders(self) -> dict[int, bool]:
        """step -> whether its checkpoint is committed (has a manifest), for every step folder."""
        found: dict[int, bool] = {}
        for key in self.store.list_keys(self.prefix):
            match = _STEP_FOLDER.fullmatch(key[len(self.prefix) + 1 :])
            if match:
                step = int(match[1])
                found[step] = found.get(step, False) or match[2] == MANIFEST
        return found

    def steps(self) -> list[int]:
        """The committed checkpoints' steps, oldest first."""
        return sorted(step for step, complete in self._folders().items() if complete)

    def save(self, state: TrainState) -> None:
        """Commit ``state`` (files, then the manifest), then delete all but the newest ``keep``."""
        with self.store.staged_output(
            self.key(state.step), self.scratch_dir, {"checkpoint_step": state.step}
        ) as folder:
            write_state(state, folder)
        fault_point("train.after_checkpoint")
        self.prune(state.step)

    def prune(self, current: int) -> None:
        """Keep the newest ``keep`` committed checkpoints up to step ``current``; delete the rest:
        older ones, uncommitted leftovers, and any newer than ``current`` (a previous run's, skipped
        as damaged when this one resumed: they are being made again)."""
        folders = self._folders()
        keep = sorted(s for s, complete in folders.items() if complete and s <= current)[-self.keep :]
        for step in folders:
            if step not in keep:
                self.store.delete_prefix(self.key(step))

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix)

    def load(self, step: int) -> TrainState:
        """The checkpoint of ``step``, every file verified (``InputError`` for a damaged one)."""
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        # A private copy (ranks on one node share the scratch folder), deleted once read.
        cache = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=self.scratch_dir))
        try:
            state = read_state(self.store.fetch_dir(self.key(step), cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if state.step != step:
            raise ValueError(f"{STATE_FILE} says step {state.step}")
        return state

    def newest(self, check: Callable[[TrainState], None]) -> TrainState | None:
        """The newest checkpoint that verifies and passes ``check`` (which raises ``ValueError`` for
        one this run cannot use); a failing one is skipped, with a warning naming it."""
        for step in reversed(self.steps()):
            try:
                state = self.load(step)
                check(state)
                return state
            except _UNUSABLE as e:
                print(
                    f"warning: train checkpoint {self.store.url(self.key(step))} is unusable ({e}); "
                    "trying the previous one",
                    file=sys.stderr,
                )
        return None

    def resume(self, check: Callable[[TrainState], None]) -> TrainState | None:
        """What every process resumes from: rank 0 picks the newest usable checkpoint and tells the
        others its step; each loads it (verified) itself. None: start from step 0."""
        rank, _ = distributed.rank_and_size()
        state = self.newest(check) if rank == 0 else None
        step = distributed.broadcast_object(state.step if state else None)
        if rank != 0 and step is not None:
            state = self.load(step)
            check(state)
        return state
