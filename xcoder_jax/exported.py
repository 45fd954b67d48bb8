"""The exported crosscoder, as everything after training uses it: one object, PyTorch tensors.

Training (`crosscoder.Crosscoder`, JAX) works in NORMALISED units; the export folds the
store's scales in (`export.export`), so the tensors here are in RAW units and apply to
the HF models' residual streams as they are:

    f       = JumpReLU_t(ReLU(sum_m x_m W_enc[m] + b_enc))    x: raw [.., m, d]
    x_hat_m = f W_dec[:, m] + b_dec[m]                          raw

with t the export's per-latent `threshold` on f (BatchTopK, Matryoshka; none for L1: ReLU).
f is the same in both units, so NRN, firing and thresholds need no conversion; decoder norms
are compared in normalised units (`normalised_decoder`). The analysis stream, splicing,
steering, ablation and latent selection all read this object; tests check it elementwise
against the JAX module (`export.to_module`).

Misuse is refused with one-line errors: an empty latent set to steer along or a model slot the
export does not have (`UsageError`), and, where the export records which models it was trained
on, a model that is not the one of its slot (`export.ExportError`; `check_identity`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from xcoder_jax import exclusive as excl
from xcoder_jax import export, nrn, site
from xcoder_jax.errors import UsageError

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


def _jump_relu(pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """ReLU, then zero where f < threshold: THE encoder activation (in place on `pre`)."""
    f = pre.relu_()
    return f if threshold is None else f.mul_(f >= threshold)


def _latent_groups(groups, n_latents: int) -> tuple[int, ...] | None:
    """The export's latent group sizes as ints (None without any); ExportError unless they
    are positive and cover the latents exactly."""
    if groups is None:
        return None
    sizes = tuple(int(n) for n in groups)
    if not sizes or min(sizes) < 1 or sum(sizes) != n_latents:
        raise export.ExportError(
            f"latent_groups {list(groups)} do not split the export's {n_latents} latents into "
            "consecutive non-empty groups"
        )
    return sizes


class ExportedCrosscoder:
    """The export's tensors in PyTorch (float32, RAW units) with its facts.

    Tensors: W_enc [m, d, h] (a view of the latent-major `w_enc_t` [h, m*d], the layout the
    streaming encoder multiplies with), b_enc [h], W_dec [h, m, d], b_dec [m, d], threshold
    [h] or None. Facts: `scales` [m] (normalised = raw * scale), `roles` (model slots in
    order, `export.role_order`), `layer` (block L, None if the config does not say),
    `mean_norms` [m]: each model's mean raw activation norm at block L, sqrt(d) / scale;
    `exclusive`: the dedicated latents' ranges {"base_only": (lo, hi), "distilled_only":
    (lo, hi)} the export records (`exclusive.from_export`), None when it records none;
    `latent_groups`: the sizes of a Matryoshka crosscoder's consecutive latent groups (its
    config's "latent_groups"), None for other kinds.
    """

    def __init__(self, tensors: dict[str, np.ndarray], config: dict | None = None, device="cpu"):
        config = config or {}
        m, d, h = np.shape(tensors["W_enc"])
        self.n_models, self.d_model, self.n_latents = m, d, h
        as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a, np.float32), device=device)
        self.w_enc_t = as_t(np.asarray(tensors["W_enc"]).reshape(m * d, h).T)  # [h, m*d]
        self.b_enc = as_t(tensors["b_enc"])
        self.W_dec = as_t(tensors["W_dec"])
        self.b_dec = as_t(tensors["b_dec"])
        thr = tensors.get("threshold")
        self.threshold = None if thr is None else as_t(thr)
        self.config = config
        self.layer = int(config["layer"]) if "layer" in config else None
        self.scales = np.asarray(config.get("scales", [1.0] * m), np.float32)
        self.roles = export.role_order(config)
        self.mean_norms = [math.sqrt(d) / float(s) for s in self.scales]
        self.exclusive = excl.from_export(config, h)
        self.latent_groups = _latent_groups(config.get("latent_groups"), h)

    @classmethod
    def load(cls, directory: str, device="cpu") -> ExportedCrosscoder:
        tensors, config = export.load_export(directory, "numpy")
        return cls(tensors, config, device)

    @property
    def W_enc(self) -> torch.Tensor:
        """[m, d, h] raw (a view)."""
        return self.w_enc_t.T.reshape(self.n_models, self.d_model, self.n_latents)

    def to(self, device) -> ExportedCrosscoder:
        """Moves the tensors to a torch device (for splicing into a model on a GPU)."""
        for name in ("w_enc_t", "b_enc", "W_dec", "b_dec", "threshold"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    # --- Facts in NumPy ---------------------------------------------------------------------

    def normalised_decoder(self) -> np.ndarray:
        """W_dec [h, m, d] in normalised units, where relative decoder norms are compared."""
        w_dec = {"W_dec": self.W_dec.cpu().numpy()}
        return export.normalised_decoder(w_dec, {"scales": self.scales.tolist()})

    def nrn(self, norm: str) -> np.ndarray:
        """NRN [h] of every latent (0 base-only, 0.5 shared, 1 distilled-only)."""
        return nrn.latent_nrn(self.normalised_decoder(), self.roles, norm)

    def check_latents(self, latents: Sequence[int], allow_empty: bool = True) -> list[int]:
        """The latent ids as ints; raises UsageError for ids the export does not have, and
        for an empty set unless `allow_empty`."""
        if isinstance(latents, (str, bytes)) or not hasattr(latents, "__iter__"):
            raise UsageError(f"latents must be a list of latent ids, got {latents!r}")
        ids = [int(i) for i in latents]
        if not ids and not allow_empty:
            raise UsageError("no latents given: pass at least one latent id")
        bad = [i for i in ids if not 0 <= i < self.n_latents]
        if bad:
            raise UsageError(
                f"latent ids {bad} are out of range: the export has {self.n_latents} latents "
                f"(0..{self.n_latents - 1})"
            )
        return ids

    # --- Model slots ------------------------------------------------------------------------

    def role(self, model_index: int) -> str:
        """The role of slot `model_index` ("base", "distilled")."""
        roles = self.roles if len(self.roles) == self.n_models else []
        return roles[model_index] if model_index < len(roles) else f"model {model_index}"

    def slots(self) -> str:
        """The export's model slots in words: "slots 0 (base) and 1 (distilled)"."""
        names = [f"{i} ({self.role(i)})" for i in range(self.n_models)]
        if len(names) == 1:
            return f"slot {names[0]}"
        return f"slots {', '.join(names[:-1])} and {names[-1]}"

    def check_slot(self, model_index) -> int:
        """`model_index` as an int; raises UsageError unless the export has that slot."""
        try:
            i = operator.index(model_index)
        except TypeError:
            raise UsageError(
                f"model_index must be a slot number, got {model_index!r}: the export has "
                f"{self.slots()}"
            ) from None
        if not 0 <= i < self.n_models:
            raise UsageError(f"model_index {i} is out of range: the export has {self.slots()}")
        return i

    def model_fingerprints(self) -> list[str] | None:
        """The `weights` fingerprint the export records for each slot's model (see
        `identity.model_fingerprint`); None when it records none (exports made elsewhere)."""
        models = self.config.get("models") or []
        prints = [m.get("weights") if isinstance(m, dict) else None for m in models]
        if len(prints) != self.n_models or not all(isinstance(p, str) and p for p in prints):
            return None
        return prints

    def check_identity(self, model, model_index: int, who: str = "", fix: str = "") -> None:
        """Raises ExportError unless `model` is the model of slot `model_index`
        (`identity.check_identity`: the full rule)."""
        from xcoder_jax import identity

        identity.check_identity(self, model, model_index, who, fix)

    def check_model(self, model, layer: int | None = None) -> None:
        """Raises ExportError unless `model` has the export's d_model and block L."""
        d = int(model.config.hidden_size)
        if d != self.d_model:
            raise export.ExportError(
                f"the export has d_model {self.d_model} but the model has hidden size {d}; "
                "it belongs to another model"
            )
        n = site.num_layers(model)
        if self.layer >= n:
            raise export.ExportError(
                f"the export was trained at block {self.layer} but the model has {n} blocks"
            )
        if layer is not None and layer != self.layer:
            raise export.ExportError(
                f"the export was trained at block {self.layer}, not at block {layer}"
            )

    # --- Encoding and decoding --------------------------------------------------------------

    def encode_t(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, m, d] raw -> f^T [h, batch] (latent-major, float32)."""
        pre = torch.addmm(self.b_enc[:, None], self.w_enc_t, x.reshape(len(x), -1).T)
        return _jump_relu(pre, None if self.threshold is None else self.threshold[:, None])

    def decode_t(self, f_t: torch.Tensor) -> torch.Tensor:
        """f^T [h, batch] -> x_hat [batch, m, d], raw units."""
        x_hat = torch.addmm(self.b_dec.reshape(-1), f_t.T, self.W_dec.reshape(self.n_latents, -1))
        return x_hat.reshape(-1, self.n_models, self.d_model)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., m, d] raw -> x_hat [..., m, d] raw."""
        flat = x.reshape(-1, self.n_models, self.d_model).float()
        return self.decode_t(self.encode_t(flat)).reshape(x.shape)

    def latent_acts(self, x: torch.Tensor, latents: Sequence[int]) -> torch.Tensor:
        """f of the chosen latents: x [..., m, d] raw -> [..., k] (float32).

        Each f_i depends only on latent i's encoder row (and threshold), so only those rows
        are computed.
        """
        ids = self.check_latents(latents)
        flat = x.reshape(*x.shape[:-2], self.n_models * self.d_model).float()
        pre = flat @ self.w_enc_t[ids].T + self.b_enc[ids]
        return _jump_relu(pre, None if self.threshold is None else self.threshold[ids])

    # --- Directions -------------------------------------------------------------------------

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
        Raises UsageError for an empty latent set (it would steer by nothing) and for a slot
        the export does not have.
        """
        if convention not in CONVENTIONS:
            raise UsageError(
                f"unknown steering convention {convention!r}; one of {sorted(CONVENTIONS)}"
            )
        model_index = self.check_slot(model_index)
        ids = self.check_latents(latents, allow_empty=False)
        rows = self.W_dec[ids, model_index]  # [k, d] raw
        if convention == "raw":
            return float(alpha) * rows.sum(0)
        unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return float(alpha) * self.mean_norms[model_index] * unit.sum(0)

    def ablation_delta(self, x: torch.Tensor, latents: Sequence[int], model_index: int):
        """sum_{i in S} f_i(x) W_dec[i, m]: x [..., m, d] raw -> [..., d] raw.

        Exactly zero wherever every chosen latent is inactive, and everywhere for an empty
        latent set (the clean reference of an ablation). Raises UsageError for a slot the
        export does not have.
        """
        model_index = self.check_slot(model_index)
        ids = self.check_latents(latents)
        if not ids:
            return torch.zeros(*x.shape[:-2], self.d_model, device=x.device)
        return self.latent_acts(x, ids) @ self.W_dec[ids, model_index]
