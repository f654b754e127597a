"""Merging skill experts into one adapter: ΔW = Σ wᵢ·sᵢ·BᵢAᵢ, exactly.

Averaging the A and B matrices separately is *not* averaging the experts (the product of sums has
cross terms). Concatenating the factors is exact: with A = [A₁; …; A_N] (stacked rows) and
B = [w₁s₁B₁, …, w_Ns_NB_N] (stacked columns), B·A = Σ wᵢsᵢBᵢAᵢ. The merged adapter has rank Σrᵢ and
scale 1 (alpha = rank), and loads with ``load_lora_weights`` like any other.
Pure tensor maths, no I/O: ``selma_core.phases.merge`` does the reading and writing.
"""

from __future__ import annotations

from collections.abc import Sequence

from selma_core.errors import InputError
from selma_core.lora import LoraAdapter, LoraLayer


def check_merge_inputs(experts: dict[str, LoraAdapter], weights: Sequence[float] | None) -> list[float]:
    """Validate names, layers and weights before touching any tensor; the weights to use."""
    if not experts:
        raise InputError("merge: no experts to merge")
    names = list(experts)
    if weights is None:
        weights = [1.0 / len(names)] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise InputError(f"merge: {len(weights)} weights given for {len(names)} experts ({', '.join(names)})")
    first_name, first = names[0], experts[names[0]]
    for name in names[1:]:
        layers = set(experts[name].layers)
        if layers != set(first.layers):
            missing = sorted(set(first.layers) ^ layers)[:3]
            raise InputError(
                f"merge: experts {first_name!r} and {name!r} adapt different layers (e.g. {missing}); "
                "train them with the same target modules on the same base model"
            )
        for module in first.layers:
            a, b = first.layers[module], experts[name].layers[module]
            if a.down.shape[1] != b.down.shape[1] or a.up.shape[0] != b.up.shape[0]:
                raise InputError(
                    f"merge: layer {module} has shape {tuple(a.up.shape[:1]) + tuple(a.down.shape[1:])} in "
                    f"{first_name!r} but {tuple(b.up.shape[:1]) + tuple(b.down.shape[1:])} in {name!r}: "
                    "experts of different base models"
                )
    return weights


def merge_experts(experts: dict[str, LoraAdapter], weights: Sequence[float] | None = None) -> LoraAdapter:
    """One adapter whose every layer adds exactly Σ wᵢ·sᵢ·BᵢAᵢ (default wᵢ = 1/N)."""
    import torch

    w = check_merge_inputs(experts, weights)
    adapters = list(experts.values())
    layers = {}
    for module in adapters[0].layers:
        down = torch.cat([a.layers[module].down.float() for a in adapters], dim=0)
        up = torch.cat(
            [wi * a.scale * a.layers[module].up.float() for wi, a in zip(w, adapters, strict=True)], dim=1
        )
        layers[module] = LoraLayer(down=down, up=up)
    rank = sum(a.rank for a in adapters)
    config = dict(adapters[0].config)
    config.pop("rank_pattern", None)
    config.pop("alpha_pattern", None)
    # alpha = rank gives scale 1: the weights and each expert's own scale are folded into B.
    return LoraAdapter(layers=layers, rank=rank, alpha=float(rank), use_rslora=False, config=config)
