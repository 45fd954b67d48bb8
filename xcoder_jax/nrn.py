"""Relative decoder norms: which latents belong to the base model, the distilled one, or both.

For latent i with decoder rows W_dec[i, base] and W_dec[i, distilled] (NORMALISED units, as
the crosscoder was trained; see `export.normalised_decoder`),

    r_i   = ||W_dec[i, distilled]||_p / ||W_dec[i, base]||_p      (p = 1 by default, the paper's)
    NRN_i = r_i / (1 + r_i) = n_dist / (n_base + n_dist)

so NRN 0 is base-only, 0.5 shared, 1 distilled-only. The second form needs no division by a
zero base norm; a latent with both rows zero gets NRN 0.5 (it says nothing either way).

The diffing toolkit (Minder et al.) reports the OPPOSITE direction with another formula,
on L2 norms (`dec_norm_diff`):

    dec_norm_diff_i = ((n_base - n_ft) / max(n_base, n_ft) + 1) / 2      (n: L2 norms)

1 is base-only, 0.5 shared, 0 fine-tuned-only; a shared latent with n_ft = 2 n_base has
dec_norm_diff 0.25 and NRN 2/3. latents.jsonl carries both.

A leaf module (NumPy only), so that the exported crosscoder (`ExportedCrosscoder.nrn`) and
the analysis compute NRN and the classes with the same functions.
"""

from __future__ import annotations

import numpy as np

from xcoder_jax.errors import ConfigError

# A latent's class: its NRN band, or "dead" when it never fired on a held-out row (its decoder
# rows are what initialisation and the sparsity penalty left: its NRN says nothing).
CLASSES = ("base_only", "shared", "distilled_only", "dead")
DEAD = CLASSES.index("dead")


def decoder_norms(w_dec: np.ndarray, kind: str = "l1") -> np.ndarray:
    """Per-latent, per-model norm of the decoder rows.

    w_dec: [n_latents, n_models, d_model] (normalised units). Returns [n_latents, n_models].
    """
    if kind == "l1":
        return np.abs(w_dec).sum(-1, dtype=np.float64)
    if kind == "l2":
        return np.sqrt(np.square(w_dec, dtype=np.float64).sum(-1))
    raise ConfigError(f"unknown decoder norm {kind!r} (l1, l2)")


def relative_norms(norms: np.ndarray, base: int = 0, distilled: int = 1) -> np.ndarray:
    """NRN [n_latents] from decoder norms [n_latents, n_models]."""
    nb, nd = norms[:, base], norms[:, distilled]
    total = nb + nd
    with np.errstate(invalid="ignore", divide="ignore"):
        nrn = np.where(total > 0, nd / total, 0.5)
    return nrn.astype(np.float64)


def latent_nrn(w_dec: np.ndarray, roles: list[str], kind: str) -> np.ndarray:
    """NRN [n_latents] (0 base-only, 0.5 shared, 1 distilled-only) of a decoder [h, m, d] in
    NORMALISED units whose model slots hold `roles`, with decoder norm `kind`."""
    n = decoder_norms(w_dec, kind)
    return relative_norms(n, roles.index("base"), roles.index("distilled"))


def dec_norm_diff(norms_l2: np.ndarray, base: int = 0, distilled: int = 1) -> np.ndarray:
    """The diffing toolkit's relative norm [n_latents] from L2 decoder norms [n_latents,
    n_models] (normalised units): 1 base-only, 0.5 shared, 0 distilled-only (NRN's
    opposite direction); 0.5 where both rows are zero."""
    nb, nd = norms_l2[:, base], norms_l2[:, distilled]
    top = np.maximum(nb, nd)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top > 0, ((nb - nd) / top + 1) / 2, 0.5).astype(np.float64)


def classify(
    nrn: np.ndarray,
    base_only_max: float,
    distilled_only_min: float,
    alive: np.ndarray | None = None,
) -> np.ndarray:
    """Class index per latent [n_latents] int8: 0 base-only, 1 shared, 2 distilled-only, 3 dead.

    Base-only: NRN < `base_only_max`; distilled-only: NRN > `distilled_only_min`; the rest
    is shared. With `alive` ([n_latents] bool: the latent fired on at least one held-out row,
    the rows of the dead fraction), a latent that never fired is dead whatever its NRN.
    Without it only the NRN bands apply (before the store pass, when deadness is not known
    yet). Names are `CLASSES[index]`: the one classification every output reports.
    """
    if not 0.0 <= base_only_max < distilled_only_min <= 1.0:
        raise ConfigError(
            f"NRN bands must satisfy 0 <= base_only_max < distilled_only_min <= 1, got "
            f"{base_only_max} and {distilled_only_min}"
        )
    out = np.ones(len(nrn), np.int8)
    out[nrn < base_only_max] = 0
    out[nrn > distilled_only_min] = 2
    if alive is not None:
        out[~np.asarray(alive, bool)] = DEAD
    return out


def decoder_cosine(w_dec: np.ndarray, base: int = 0, distilled: int = 1) -> np.ndarray:
    """Cosine similarity of each latent's two decoder rows [n_latents] (0 where one is zero).

    Invariant to the per-model normalisation scales, so raw or normalised W_dec give the same.
    """
    a = w_dec[:, base].astype(np.float64)
    b = w_dec[:, distilled].astype(np.float64)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, dot / denom, 0.0)
