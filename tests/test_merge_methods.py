"""Merge methods on tiny hand-made tensors and on real (tiny, random) diffusers LoRAs."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import TARGETS, fused_deltas, trained_like_expert

from selma_core.errors import ConfigError, InputError
from selma_core.lora import load_adapter, save_adapter
from selma_core.merging import adapter_from_deltas, check_merge_inputs, factorize, merge_layer_deltas
from selma_core.models.loading import load_diffusion_pipeline
from selma_core.phases.merge import (
    KOHYA_FILE,
    MergeConfig,
    export_fused,
    export_kohya,
    merge_adapters,
    resolve_weights,
)
from selma_core.phases.merge_search import MergeSearchConfig

T1 = torch.tensor([[3.0, -2.0], [0.5, 1.0]])
T2 = torch.tensor([[-1.0, -4.0], [0.2, 2.0]])


def test_ties_follows_its_definition_on_a_hand_made_example():
    # density 0.5 keeps the two largest magnitudes of each: T1 -> [[3,-2],[0,0]], T2 -> [[0,-4],[0,2]].
    # Elected signs (sign of the trimmed sum [[3,-6],[0,2]], 0 counts as +): [[+,-],[+,+]].
    # Disjoint mean over the experts that agree (zeros never agree): [[3, -3], [0, 2]].
    merged = merge_layer_deltas("ties", [T1, T2], [1.0, 1.0], density=0.5)
    assert torch.equal(merged, torch.tensor([[3.0, -3.0], [0.0, 2.0]]))
    weighted = merge_layer_deltas("ties", [T1, T2], [0.5, 2.0], density=0.5)
    assert torch.equal(weighted, torch.tensor([[1.5, (-1.0 - 8.0) / 2], [0.0, 4.0]]))


def test_magnitude_prune_and_task_arithmetic():
    assert torch.equal(merge_layer_deltas("task_arithmetic", [T1, T2], [0.5, 0.25]), 0.5 * T1 + 0.25 * T2)
    pruned = merge_layer_deltas("magnitude_prune", [T1, T2], [1.0, 1.0], density=0.5)
    assert torch.equal(pruned, torch.tensor([[3.0, -6.0], [0.0, 2.0]]))


def test_dare_drops_and_rescales_and_is_unbiased():
    big = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    dropped = merge_layer_deltas("dare_linear", [big], [1.0], density=0.25)
    kept = dropped != 0
    assert 0.2 < kept.float().mean() < 0.3  # about a quarter survives
    torch.testing.assert_close(dropped[kept], big[kept] / 0.25)  # survivors rescaled by 1/density
    torch.manual_seed(2)
    mean = sum(merge_layer_deltas("dare_linear", [big], [1.0], density=0.5) for _ in range(400)) / 400
    assert (mean - big).abs().mean() < 0.1 * big.abs().mean()  # E[DARE(τ)] = τ
    full = merge_layer_deltas("dare_ties", [T1, T2], [1.0, 1.0], density=1.0)
    assert torch.equal(full, merge_layer_deltas("ties", [T1, T2], [1.0, 1.0], density=1.0))


def test_svd_error_falls_with_rank_and_is_zero_at_full_rank():
    g = torch.Generator().manual_seed(0)
    deltas = {"unet.a.to_q": torch.randn(12, 10, generator=g), "unet.b.to_k": torch.randn(8, 16, generator=g)}
    errors = [adapter_from_deltas(deltas, rank, {})[1].total_error for rank in (1, 2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3
    adapter, report = adapter_from_deltas(deltas, None, {})
    assert report.total_error < 1e-5 and max(report.layer_errors.values()) < 1e-5
    assert adapter.rank_pattern == {"b.to_k": 8} and adapter.rank == 10  # per-layer full ranks
    for module, delta in deltas.items():
        torch.testing.assert_close(adapter.delta(module), delta, atol=1e-5, rtol=1e-5)
    down, up, error = factorize(torch.zeros(3, 3), 2)
    assert error == 0.0


def test_weights_are_checked():
    skills = ["counting", "spatial"]
    assert resolve_weights(MergeConfig(), skills) == [0.5, 0.5]
    assert resolve_weights(MergeConfig(method="ties"), skills) == [1.0, 1.0]
    with pytest.raises(ConfigError, match="empty mapping"):
        resolve_weights(MergeConfig(weights={}), skills)
    with pytest.raises(ConfigError, match="unknown skill 'colour'"):
        resolve_weights(MergeConfig(weights={"counting": 1, "spatial": 1, "colour": 1}), skills)
    with pytest.raises(ConfigError, match="negative, which method ties does not allow"):
        resolve_weights(MergeConfig(method="ties", weights={"counting": 1, "spatial": -1}), skills)
    assert resolve_weights(
        MergeConfig(method="task_arithmetic", weights={"counting": 1, "spatial": -1}), skills
    ) == [
        1,
        -1,
    ]
    with pytest.raises(ValueError, match="export_rank"):
        MergeConfig(export="svd")
    # YAML reads .nan and .inf as numbers: they would merge into an all-NaN adapter.
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"weights: spatial: expected a finite number, got {bad}"):
            MergeConfig(weights={"counting": 1.0, "spatial": bad})
        with pytest.raises(ValueError, match="low and high: expected finite numbers"):
            MergeSearchConfig(high=bad)
    with pytest.raises(InputError, match=r"merge: weights \[nan, 1.0\]: expected finite numbers"):
        check_merge_inputs({"a": None, "b": None}, [float("nan"), 1.0])


@pytest.fixture(scope="module")
def experts(model_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {
        "a": trained_like_expert(model_cache, 0, 2, 4.0, root / "a"),
        "b": trained_like_expert(model_cache, 1, 3, 3.0, root / "b"),
    }


def unet_output(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    hidden = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=hidden).sample


def test_exact_merge_equals_set_adapters_with_the_same_weights(experts, model_cache, tmp_path):
    loaded = {name: load_adapter(path) for name, path in experts.items()}
    merged, report = merge_adapters(loaded, MergeConfig(weights={"a": 0.7, "b": 0.3}), [0.7, 0.3])
    assert report.total_error == 0.0
    save_adapter(merged, tmp_path / "merged")
    one = load_diffusion_pipeline("random:tiny-sd", model_cache)
    one.load_lora_weights(str(tmp_path / "merged"))
    side_by_side = load_diffusion_pipeline("random:tiny-sd", model_cache)
    for name, path in experts.items():
        side_by_side.load_lora_weights(str(path), adapter_name=name)
    side_by_side.set_adapters(["a", "b"], [0.7, 0.3])
    torch.testing.assert_close(unet_output(one), unet_output(side_by_side), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "magnitude_prune", "dare_linear"])
def test_delta_methods_export_exactly_through_diffusers(experts, model_cache, tmp_path, method):
    loaded = {name: load_adapter(path) for name, path in experts.items()}
    cfg = MergeConfig(method=method, density=0.6, seed=3)
    weights = resolve_weights(cfg, list(loaded))
    merged, report = merge_adapters(loaded, cfg, weights)
    assert report.total_error < 1e-5
    again, _ = merge_adapters(loaded, cfg, weights)  # seeded: DARE's drops repeat
    save_adapter(merged, tmp_path / "m")
    applied = fused_deltas(model_cache, tmp_path / "m")
    for module in merged.layers:
        name = module.removeprefix("unet.") + ".weight"
        torch.testing.assert_close(applied[name], merged.delta(module), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(again.delta(module), merged.delta(module))


@pytest.mark.parametrize("method", ["linear", "ties"])  # ties: each layer at its own rank
def test_kohya_round_trip_and_fused_pipeline(experts, model_cache, tmp_path, method):
    loaded = {name: load_adapter(path) for name, path in experts.items()}
    merged, _ = merge_adapters(loaded, MergeConfig(method=method), [0.5, 0.5])
    if method == "ties":
        assert len({layer.down.shape[0] for layer in merged.layers.values()}) > 1
    save_adapter(merged, tmp_path / "adapter")
    export_kohya(merged, tmp_path / KOHYA_FILE)
    from safetensors import safe_open

    with safe_open(str(tmp_path / KOHYA_FILE), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    # No alphas: scales are in the up factors (per-layer alphas made diffusers misread mixed ranks).
    assert all(k.startswith("lora_unet_") for k in keys) and not any(k.endswith(".alpha") for k in keys)
    diffusers_way = fused_deltas(model_cache, tmp_path / "adapter")
    kohya_way = fused_deltas(model_cache, tmp_path / KOHYA_FILE)
    assert diffusers_way.keys() == kohya_way.keys()
    for name in diffusers_way:
        torch.testing.assert_close(kohya_way[name], diffusers_way[name], rtol=1e-4, atol=1e-6)
    if method == "ties":
        return  # the fused pipeline does not depend on the method

    export_fused("random:tiny-sd", model_cache, None, tmp_path / "adapter", tmp_path / "fused")
    fused = load_diffusion_pipeline(str(tmp_path / "fused"), model_cache)
    with_adapter = load_diffusion_pipeline("random:tiny-sd", model_cache)
    with_adapter.load_lora_weights(str(tmp_path / "adapter"))
    torch.testing.assert_close(unet_output(fused), unet_output(with_adapter), rtol=1e-4, atol=1e-5)
    assert len(TARGETS) == 4
