"""Merging skill experts into one adapter: ΔW = Σ wᵢ·sᵢ·BᵢAᵢ, exactly.

Averaging the A and B matrices separately is *not* averaging the experts (the product of sums has
cross terms). Concatenating the factors is exact: with A = [A₁; …; A_N] (stacked rows) and
B = [w₁s₁B₁, …, w_Ns_NB_N] (stacked columns), B·A = Σ wᵢsᵢBᵢAᵢ. The merged adapter has rank Σrᵢ and
scale 1 (alpha = rank), and loads with ``load_lora_weights`` like any other.
Pure tensor maths, no I/O: ``selma_core.phases.merge`` does the reading and writing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"merge: weights {weights}: expected finite numbers")
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
            [
                wi * a.layer_scale(module) * a.layers[module].up.float()
                for wi, a in zip(w, adapters, strict=True)
            ],
            dim=1,
        )
        layers[module] = LoraLayer(down=down, up=up)
    return _unit_scale_adapter(layers, dict(adapters[0].config))


def _unit_scale_adapter(layers: dict[str, LoraLayer], config: dict) -> LoraAdapter:
    """An adapter whose every layer has scale 1 (alpha = its rank): any weights are folded into B.

    Layers whose rank differs from the most common one get peft ``rank_pattern``/``alpha_pattern``
    entries, which ``load_lora_weights`` honours.
    """
    from collections import Counter

    ranks = {module: layer.down.shape[0] for module, layer in layers.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m.removeprefix("unet."): r for m, r in ranks.items() if r != rank}
    config = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern")}
    return LoraAdapter(
        layers=layers,
        rank=rank,
        alpha=float(rank),
        use_rslora=False,
        config=config,
        rank_pattern=pattern,
        alpha_pattern={m: float(r) for m, r in pattern.items()},
    )


# -- merging full ΔW per layer (task arithmetic, TIES, DARE, magnitude pruning) ------------------

DELTA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Methods whose sign election or disjoint mean give negative weights no meaning.
NONNEGATIVE_METHODS = ("ties", "dare_ties", "magnitude_prune", "dare_linear")


def merge_layer_deltas(
    method: str,
    deltas: list,
    weights: Sequence[float],
    density: float = 1.0,
    majority_sign_method: str = "total",
):
    """One layer's merged ΔW from the experts' full ΔW (sᵢ·BᵢAᵢ each), by peft's merge utilities.

    - task_arithmetic: Σ wᵢ·ΔWᵢ (Ilharco et al., 2023).
    - magnitude_prune: each ΔWᵢ keeps its ``density`` largest-magnitude entries, then Σ wᵢ·ΔWᵢ.
    - ties (Yadav et al., 2023): trim as above, elect each entry's sign from the trimmed sum
      (``total``) or majority count (``frequency``), then average wᵢ·ΔWᵢ over the experts that agree.
    - dare_linear / dare_ties (Yu et al., 2024): random drop to ``density`` with 1/density rescale,
      then a weighted sum / the TIES election and disjoint mean. Seed torch's RNG for reproducibility.
    """
    import torch
    from peft.utils import merge_utils

    w = torch.tensor(list(weights), dtype=deltas[0].dtype)
    if method == "task_arithmetic":
        return merge_utils.task_arithmetic(deltas, w)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(deltas, w, density)
    if method == "ties":
        return merge_utils.ties(deltas, w, density, majority_sign_method)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, w, density)
    if method == "dare_ties":
        return merge_utils.dare_ties(deltas, w, density, majority_sign_method)
    raise ValueError(f"unknown merge method {method!r}; expected one of {', '.join(DELTA_METHODS)}")


def factorize(delta, rank: int | None = None):
    """LoRA factors (down, up) with up·down ≈ ΔW: truncated SVD to ``rank`` (None: full, exact).

    Returns (down, up, relative Frobenius error ‖ΔW − up·down‖ / ‖ΔW‖).
    """
    import torch

    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    keep = len(s) if rank is None else min(rank, len(s))
    up = u[:, :keep] * s[:keep]
    down = vh[:keep]
    norm = torch.linalg.norm(delta.float())
    error = torch.linalg.norm(delta.float() - up @ down) / norm if norm > 0 else torch.tensor(0.0)
    return down.contiguous(), up.contiguous(), float(error)


@dataclass
class MergeReport:
    """How the merged adapter relates to the exact merge, layer by layer."""

    rank: int
    layer_errors: dict[str, float]
    total_error: float  # ‖ΔW − BA‖_F / ‖ΔW‖_F over all layers together


def adapter_from_deltas(deltas: dict, rank: int | None, config: dict) -> tuple[LoraAdapter, MergeReport]:
    """An adapter (scale 1) whose layers approximate ``deltas``; exact when ``rank`` is None."""
    import torch

    layers, errors = {}, {}
    err_sq = total_sq = 0.0
    ranks = set()
    for module, delta in deltas.items():
        down, up, error = factorize(delta, rank)
        layers[module] = LoraLayer(down=down, up=up)
        errors[module] = error
        ranks.add(down.shape[0])
        norm_sq = float(torch.linalg.norm(delta.float()) ** 2)
        err_sq += (error**2) * norm_sq
        total_sq += norm_sq
    adapter = _unit_scale_adapter(layers, config)
    total = (err_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return adapter, MergeReport(rank=max(ranks), layer_errors=errors, total_error=total)
