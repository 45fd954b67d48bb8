"""Removing latents from a model's block-L input: the one subtraction and where it applies.

Ablating a latent set S in model m replaces the input of block L by

    x_m <- x_m - sum_{i in S} f_i(x) W_dec[i, m]       (`ExportedCrosscoder.ablation_delta`)

at the positions the crosscoder reads: those where the store would hold a row. Extraction
leaves out the positions of its `Exclusion` (the first n of every document, the special or
named tokens it was told to skip) and, in a padded batch, the padding; there the crosscoder
never saw an activation, so they keep their clean value. The rule and the subtraction are
here once, for the public hook (`steering.hooks.ablate`) and for the ablation experiment's
probe (`ablation.probe.LogitProbe`), so both intervene at the same positions with the same
numbers. Splice-in and attribution read the same positions (`stored_positions`).
"""

from __future__ import annotations

import torch

from xcoder_jax.activations.exclude import Exclusion


def as_exclusion(exclusion: Exclusion | int | None) -> Exclusion:
    """An `Exclusion` from the store's (returned as it is), from an int n (the first n
    positions, no token: `Exclusion(first=n)`), or from None (position 0 only, the attention
    sink: what extraction leaves out by default)."""
    if exclusion is None:
        return Exclusion()
    if isinstance(exclusion, Exclusion):
        return exclusion
    return Exclusion(first=int(exclusion))


def stored_positions(
    input_ids: torch.Tensor, exclusion: Exclusion | int | None = None, attention_mask=None
) -> torch.Tensor:
    """bool [batch, seq]: True where the store would hold a row for these tokens (kept by
    `exclusion`, see `as_exclusion`, and not padding where `attention_mask` is given)."""
    kept = as_exclusion(exclusion).keep(input_ids)
    if attention_mask is not None:
        kept = kept & attention_mask.bool()
    return kept


def subtract(hidden: torch.Tensor, delta: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """hidden - delta where `where` [batch, seq] (bool), hidden elsewhere (bit for bit).

    hidden, delta: [batch, seq, d]; the result has hidden's dtype and device."""
    delta = delta.to(hidden.device)
    return hidden - torch.where(where.to(hidden.device)[..., None], delta, 0.0).to(hidden.dtype)
