"""Interventions at the crosscoder's site with the exported dictionary, in PyTorch.

Two interventions on the input of block L (through `site.block_input_hook`, so they act on
exactly the residual stream the crosscoder was trained on):

- steering adds a vector built from the steered model's own decoder rows, `x <- x + v`, at
  every position (`CONVENTIONS`: how alpha scales it);
- ablation removes chosen latents' contribution and keeps everything else, including the
  crosscoder's reconstruction error: `x_m <- x_m - sum_{i in S} f_i(x) W_dec[i, m]`.

The crosscoder's encoder reads BOTH models at once (`f = ReLU(sum_m x_m W_enc[m] + b_enc)`),
so f cannot be computed from the ablated model's residual alone. `ablate` therefore first
runs both models on the same input up to block L, computes f there, and only then installs
the subtraction in the target model; the target model's block-L input is then exactly the
one f was computed from. The hooks are removed on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import site

# How alpha scales the steering vector of model m for latent set S, in raw activation units
# at block L: {name: (alpha's units in words, the vector as computed)}. "raw" is the
# paper's; "norm" makes one alpha mean the same push in models of different scale.
CONVENTIONS = {
    "norm": (
        "multiples of the model's mean raw activation norm at block L (sqrt(d_model) / scale) "
        "per latent: each latent adds its unit-normalised decoder row for the model; the sum "
        "over a multi-latent set is not renormalised",
        "alpha * mean_norm_m * sum_{i in S} W_dec[i, m] / ||W_dec[i, m]||",
    ),
    "raw": (
        "multiples of the latents' exported decoder rows for the model, in raw activation "
        "units (the rows as the crosscoder decodes them, unscaled)",
        "alpha * sum_{i in S} W_dec[i, m]",
    ),
}


class ExportedCrosscoder:
    """The export's tensors in PyTorch, RAW units, with what the interventions need.

    W_enc [m, d, h], b_enc [h], W_dec [h, m, d], optional threshold [h] (BatchTopK: f is kept
    where f >= threshold). `mean_norms` [m]: each model's mean raw activation norm at block L,
    sqrt(d) / s_m from the export's normalisation scales s_m (normalised = raw * s_m, with
    normalised activations of mean norm sqrt(d)).
    """

    def __init__(self, tensors: dict[str, np.ndarray], config: dict, device="cpu"):
        as_t = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=device)
        self.W_enc = as_t(tensors["W_enc"])
        self.b_enc = as_t(tensors["b_enc"])
        self.W_dec = as_t(tensors["W_dec"])
        thr = tensors.get("threshold")
        self.threshold = None if thr is None else as_t(thr)
        self.config = config
        self.n_models, self.d_model, self.n_latents = self.W_enc.shape
        self.layer = int(config["layer"])
        scales = np.asarray(config.get("scales", [1.0] * self.n_models), np.float64)
        self.mean_norms = [math.sqrt(self.d_model) / float(s) for s in scales]

    @classmethod
    def load(cls, directory: str, device="cpu") -> ExportedCrosscoder:
        tensors, config = ckpt.load_export(directory, "numpy")
        return cls(tensors, config, device)

    # --- Checks ---------------------------------------------------------------------------

    def check_latents(self, latents: Sequence[int]) -> list[int]:
        ids = [int(i) for i in latents]
        bad = [i for i in ids if not 0 <= i < self.n_latents]
        if bad:
            raise ValueError(
                f"latent ids {bad} are out of range: the export has {self.n_latents} latents "
                f"(0..{self.n_latents - 1})"
            )
        return ids

    def check_model(self, model, layer: int | None = None) -> None:
        """Raises ExportError unless `model` has the export's d_model and block L."""
        d = int(model.config.hidden_size)
        if d != self.d_model:
            raise ckpt.ExportError(
                f"the export has d_model {self.d_model} but the model has hidden size {d}; "
                "it belongs to another model"
            )
        n = site.num_layers(model)
        if self.layer >= n:
            raise ckpt.ExportError(
                f"the export was trained at block {self.layer} but the model has {n} blocks"
            )
        if layer is not None and layer != self.layer:
            raise ckpt.ExportError(
                f"the export was trained at block {self.layer}, not at block {layer}"
            )

    # --- Directions and activations -------------------------------------------------------

    def steering_vector(
        self, latents: Sequence[int], model_index: int, alpha: float, convention: str = "norm"
    ) -> torch.Tensor:
        """The vector steering model `model_index` along its own decoder rows: [d], raw units.

        "norm": alpha * mean_norm_m * sum_i W_dec[i, m] / ||W_dec[i, m]|| -- alpha is in units
        of the model's mean activation norm at block L, so alpha = 1 adds, per latent, a
        vector as long as a typical residual whatever the model's scale. Rows are
        normalised one by one and their sum is not, so k latents with aligned rows add up
        to k times that length. A latent whose row for model m is zero contributes nothing.
        "raw" (the paper's): alpha * sum_i W_dec[i, m], the exported raw-unit rows unscaled.
        """
        if convention not in CONVENTIONS:
            raise ValueError(
                f"unknown steering convention {convention!r}; one of {sorted(CONVENTIONS)}"
            )
        ids = self.check_latents(latents)
        rows = self.W_dec[ids, model_index]  # [k, d] raw
        if convention == "raw":
            return float(alpha) * rows.sum(0)
        unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return float(alpha) * self.mean_norms[model_index] * unit.sum(0)

    def latent_acts(self, x: torch.Tensor, latents: Sequence[int]) -> torch.Tensor:
        """f of the chosen latents: x [..., m, d] raw -> [..., k] (float32).

        Each f_i depends only on latent i's encoder column (and threshold), so only those
        columns are computed.
        """
        ids = self.check_latents(latents)
        w = self.W_enc[:, :, ids].reshape(self.n_models * self.d_model, len(ids))
        flat = x.reshape(*x.shape[:-2], self.n_models * self.d_model).float()
        f = torch.relu(flat @ w + self.b_enc[ids])
        if self.threshold is not None:
            f = f * (f >= self.threshold[ids])
        return f

    def ablation_delta(self, x: torch.Tensor, latents: Sequence[int], model_index: int):
        """sum_{i in S} f_i(x) W_dec[i, m]: x [..., m, d] raw -> [..., d] raw.

        Exactly zero wherever every chosen latent is inactive.
        """
        ids = self.check_latents(latents)
        if not ids:
            return torch.zeros(*x.shape[:-2], self.d_model, device=x.device)
        return self.latent_acts(x, ids) @ self.W_dec[ids, model_index]


# --- Context managers -----------------------------------------------------------------------


@contextlib.contextmanager
def add_at_site(model, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Adds `vector` [d] (raw) to the input of block `layer` at every position.

    An all-zero vector installs a hook that leaves the input untouched, so logits are
    bit-identical to the clean model's.
    """
    if bool((vector == 0).all()):
        fn = lambda hidden: None
    else:
        fn = lambda hidden: hidden + vector.to(hidden.device, hidden.dtype)
    with site.block_input_hook(model, layer, fn):
        yield


@contextlib.contextmanager
def steer(
    model,
    xcoder: ExportedCrosscoder,
    latents: Sequence[int],
    alpha: float,
    model_index: int,
    convention: str = "norm",
) -> Iterator[torch.Tensor]:
    """Steers `model` (crosscoder slot `model_index`) along its own decoder rows of `latents`.

    Yields the added vector [d] (raw); see `ExportedCrosscoder.steering_vector` for alpha
    and `convention` ("norm" or "raw").
    """
    xcoder.check_model(model)
    vector = xcoder.steering_vector(latents, model_index, alpha, convention)
    with add_at_site(model, xcoder.layer, vector):
        yield vector


@contextlib.contextmanager
def subtract_at_site(
    model, layer: int, delta: torch.Tensor, first_position: int = 1
) -> Iterator[None]:
    """x <- x - delta at the input of block `layer`, for positions >= `first_position`.

    delta: [batch, seq, d] raw, for exactly the input the model is then run on. Positions
    before `first_position` (the attention sink, never seen by the crosscoder) keep their
    clean value.
    """

    def fn(hidden):
        if hidden.shape != delta.shape:
            raise ValueError(
                f"the ablation was prepared for block inputs of shape {tuple(delta.shape)}, "
                f"but the model was run on {tuple(hidden.shape)}"
            )
        out = hidden.clone()
        d = delta[:, first_position:].to(hidden.device, hidden.dtype)
        out[:, first_position:] = hidden[:, first_position:] - d
        return out

    with site.block_input_hook(model, layer, fn):
        yield


@torch.no_grad()
def site_inputs(models: Sequence, layer: int, input_ids, attention_mask=None) -> torch.Tensor:
    """Both models' block-L inputs on the same tokens: [batch, seq, m, d], raw, float32."""
    return torch.stack(
        [site.forward_to_site(m, layer, input_ids, attention_mask).float() for m in models], 2
    )


@contextlib.contextmanager
def ablate(
    models: Sequence,
    target: int,
    xcoder: ExportedCrosscoder,
    latents: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    first_position: int = 1,
    x: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Removes `latents`' contribution from `models[target]`'s block-L input for this input.

    models: the pair in crosscoder order. f is computed from both models' block-L inputs on
    `input_ids` (or from `x` [batch, seq, m, d] raw, when the caller already has them); the
    target model must then be run on the same `input_ids` inside the context. An empty
    latent set leaves the model untouched. Yields the subtracted delta [batch, seq, d].
    """
    ids = xcoder.check_latents(latents)
    for m in models:
        xcoder.check_model(m)
    if x is None:
        x = site_inputs(models, xcoder.layer, input_ids, attention_mask)
    delta = xcoder.ablation_delta(x, ids, target)
    if not ids:
        with site.block_input_hook(models[target], xcoder.layer, lambda hidden: None):
            yield delta
        return
    with subtract_at_site(models[target], xcoder.layer, delta, first_position):
        yield delta
