"""Merging is exact: the merged adapter adds Σ wᵢ·sᵢ·BᵢAᵢ to every layer, as diffusers loads it."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import fused_deltas, trained_like_expert
from safetensors import safe_open

from selma_core.errors import InputError
from selma_core.lora import WEIGHT_NAME, LoraAdapter, LoraLayer, load_adapter, save_adapter
from selma_core.merging import merge_experts


def random_adapter(seed: int, rank: int, alpha: float, shapes: dict[str, tuple[int, int]]) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    layers = {
        m: LoraLayer(down=torch.randn(rank, i, generator=g), up=torch.randn(o, rank, generator=g))
        for m, (o, i) in shapes.items()
    }
    return LoraAdapter(layers=layers, rank=rank, alpha=alpha, config={"r": rank, "lora_alpha": alpha})


SHAPES = {"unet.a.to_q": (6, 5), "unet.b.to_k": (3, 7)}


def test_merge_equals_weighted_sum_of_expert_deltas():
    experts = {
        "x": random_adapter(0, 2, 4.0, SHAPES),
        "y": random_adapter(1, 3, 1.5, SHAPES),
        "z": random_adapter(2, 4, 4.0, SHAPES),
    }
    weights = [0.5, 0.3, 0.2]
    merged = merge_experts(experts, weights)
    assert merged.rank == 9 and merged.scale == 1.0
    for module in SHAPES:
        expected = sum(
            w * (e.alpha / e.rank) * e.layers[module].up @ e.layers[module].down
            for w, e in zip(weights, experts.values(), strict=True)
        )
        torch.testing.assert_close(merged.delta(module), expected, rtol=1e-5, atol=1e-6)


def test_default_weights_are_the_mean_and_averaging_factors_would_be_wrong():
    experts = {"x": random_adapter(3, 2, 2.0, SHAPES), "y": random_adapter(4, 2, 2.0, SHAPES)}
    merged = merge_experts(experts)
    module = "unet.a.to_q"
    mean = (experts["x"].delta(module) + experts["y"].delta(module)) / 2
    torch.testing.assert_close(merged.delta(module), mean, rtol=1e-5, atol=1e-6)
    # What naive tools do (average A and B separately) is not the mean of the experts.
    naive = (
        (experts["x"].layers[module].up + experts["y"].layers[module].up)
        / 2
        @ ((experts["x"].layers[module].down + experts["y"].layers[module].down) / 2)
    )
    assert not torch.allclose(naive, mean, atol=1e-3)


def test_one_expert_with_weight_one_reproduces_it():
    expert = random_adapter(5, 3, 6.0, SHAPES)
    merged = merge_experts({"only": expert}, [1.0])
    for module in SHAPES:
        torch.testing.assert_close(merged.delta(module), expert.delta(module))


def test_bad_merge_inputs_are_named():
    a, b = random_adapter(0, 2, 2.0, SHAPES), random_adapter(1, 2, 2.0, {"unet.a.to_q": (6, 5)})
    with pytest.raises(InputError, match="adapt different layers"):
        merge_experts({"a": a, "b": b})
    with pytest.raises(InputError, match="2 weights given for 1 experts"):
        merge_experts({"a": a}, [0.5, 0.5])
    with pytest.raises(InputError, match="no experts"):
        merge_experts({})
    c = random_adapter(1, 2, 2.0, {"unet.a.to_q": (6, 9), "unet.b.to_k": (3, 7)})
    with pytest.raises(InputError, match="different base models"):
        merge_experts({"a": a, "c": c})


def test_merged_adapter_loads_in_diffusers_and_adds_the_mean_delta(tmp_path, model_cache):
    a = trained_like_expert(model_cache, 0, 2, 4.0, tmp_path / "a")
    b = trained_like_expert(model_cache, 1, 3, 3.0, tmp_path / "b")
    merged = merge_experts({"a": load_adapter(a), "b": load_adapter(b)})
    save_adapter(merged, tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / WEIGHT_NAME), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())  # noqa: SIM118
    da, db, dm = (fused_deltas(model_cache, p) for p in (a, b, tmp_path / "merged"))
    assert da.keys() == dm.keys() and len(dm) == len(merged.layers) > 0
    for name in dm:
        assert da[name].abs().max() > 0
        torch.testing.assert_close(dm[name], (da[name] + db[name]) / 2, rtol=1e-4, atol=1e-6)


def test_adapter_files_round_trip(tmp_path, model_cache):
    path = trained_like_expert(model_cache, 2, 2, 8.0, tmp_path / "e")
    adapter = load_adapter(path)
    assert adapter.rank == 2 and adapter.alpha == 8.0 and adapter.scale == 4.0
    save_adapter(adapter, tmp_path / "copy")
    again = load_adapter(tmp_path / "copy")
    for module in adapter.layers:
        torch.testing.assert_close(again.delta(module), adapter.delta(module))


def test_load_adapter_refuses_non_safetensors_and_missing(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"pickle")
    with pytest.raises(InputError, match="only safetensors"):
        load_adapter(tmp_path / "x.bin")
    with pytest.raises(InputError, match="no pytorch_lora_weights.safetensors"):
        load_adapter(tmp_path)


def test_an_adapter_saved_in_separate_processes_is_the_same_bytes(tmp_path):
    """safetensors writes its metadata from a Rust HashMap, in an order that changes between
    processes: the same adapter gave other bytes, so another SHA-256, and a merge retried after
    registering registered a second version of the same weights. Saved here in four processes."""
    import subprocess
    import sys

    from conftest import REPO

    script = (
        "import sys, torch\n"
        "from selma_core.lora import LoraAdapter, LoraLayer, save_adapter\n"
        "g = torch.Generator().manual_seed(0)\n"
        "layer = LoraLayer(down=torch.randn(2, 5, generator=g), up=torch.randn(6, 2, generator=g))\n"
        "adapter = LoraAdapter({'unet.a.to_q': layer}, rank=2, alpha=4.0, config={'r': 2, 'lora_alpha': 4})\n"
        "save_adapter(adapter, sys.argv[1])\n"
    )
    files = []
    for i in range(4):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True, cwd=REPO)
        files.append((tmp_path / str(i) / WEIGHT_NAME).read_bytes())
    assert len(set(files)) == 1
    with safe_open(str(tmp_path / "0" / WEIGHT_NAME), "pt") as f:
        assert set(f.metadata()) == {"format", "lora_adapter_metadata"}


def test_canonical_safetensors_orders_the_metadata_and_moves_no_tensor(tmp_path):
    import json
    import struct

    from safetensors.torch import load_file, save_file

    from selma_core.lora import canonical_safetensors

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    metadata = {"z": "last", "format": "pt", "m": '{"nested": "json"}'}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    # The same file with its metadata in the reverse order, as another process may write it.
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    other = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode().ljust(length, b" ")
    reversed_path = tmp_path / "r.safetensors"
    reversed_path.write_bytes(raw[:8] + other + raw[8 + length :])
    for p in (path, reversed_path):
        canonical_safetensors(p)
    assert path.read_bytes() == reversed_path.read_bytes()
    assert len(path.read_bytes()) == len(raw)
    assert list(json.loads(path.read_bytes()[8 : 8 + length])["__metadata__"]) == ["format", "m", "z"]
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == metadata
