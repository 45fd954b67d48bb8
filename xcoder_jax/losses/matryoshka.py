"""The Matryoshka BatchTopK loss (Bussmann et al. 2025), whole: nested groups of latents on
BatchTopK's selection, its dense and sparse paths, and its defaults.

The latents are split into consecutive groups (`crosscoder.group_fractions`, sizes from
`group_sizes`); the prefix made of groups 0..g must reconstruct on its own. One batch top-k
selection, exactly BatchTopK's (same k, decoder-norm-weighted, masked rows claim no slot,
k-annealing by `batchtopk.k_at`), serves every prefix:

    x_hat_g = b_dec + sum over kept (row, latent i), i in groups 0..g, of f_i W_dec[i]
    loss    = sum_g squared_error(x, x_hat_g) + aux_coeff * AuxK

AuxK and the EMA inference threshold are BatchTopK's, on the full reconstruction's residual,
so inference is the same per-latent JumpReLU (`batchtopk.encode`); aux["x_hat"] and
aux["mse"] are the full reconstruction's (FVE means what it means for BatchTopK), and
aux["prefix_mse"] [n_groups] holds each prefix's error.

The dense path decodes once, split into group slices (f[:, a:b] W_dec[a:b]), and sums the
groups' contributions cumulatively. The sparse path segment-sums each kept pair's
contribution into segment row * n_groups + group, then sums cumulatively over groups.
`batchtopk.use_sparse` chooses, as for BatchTopK; both give the same loss, gradients and
updates to float tolerance (`tests/test_matryoshka.py`). The sparse selection and AuxK are
BatchTopK's own functions (`pairs.select_pairs`, `pairs.decode_selection`), and the loss object's
step is `batchtopk.topk_step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.errors import ConfigError
from xcoder_jax.losses import batchtopk
from xcoder_jax.losses.batchtopk import BatchTopK, batch_topk, topk_step
from xcoder_jax.losses.common import check_inputs, check_outputs, squared_error
from xcoder_jax.losses.pairs import auxk_loss, auxk_pairs, decode_selection, select_pairs

NAME = "matryoshka"

# dictionary_learning's example: groups of 1/32, 1/16, 1/8 and 1/4 of the latents, the
# rest in the last group.
DEFAULT_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)

# BatchTopK's: the same initial decoder norm and the same inference encoder.
dec_init_norm = batchtopk.dec_init_norm
encode = batchtopk.encode


def group_sizes(fractions, n_latents: int) -> tuple[int, ...]:
    """The groups' sizes: round(fraction * n_latents), at least 1, the last group taking the
    remainder. Where the rounding leaves the last group no latent, the largest earlier
    groups give one each. ConfigError for more groups than latents."""
    fractions = tuple(float(f) for f in fractions)
    if not fractions or len(fractions) > n_latents:
        raise ConfigError(
            f"crosscoder.group_fractions: {len(fractions)} groups for {n_latents} latents "
            "(at least 1 group, at most one per latent)"
        )
    sizes = [max(1, round(f * n_latents)) for f in fractions[:-1]]
    while sum(sizes) > n_latents - 1:  # the last group keeps at least one latent
        sizes[sizes.index(max(sizes))] -= 1
    return (*sizes, n_latents - sum(sizes))


def _ends(groups) -> tuple[int, ...]:
    """The exclusive end of each group: cumulative sizes."""
    out, total = [], 0
    for n in groups:
        total += n
        out.append(total)
    return tuple(out)


def _result(model, x, weights, prefix, aux_term, aux_coeff, f, kept):
    """(loss, aux) from the prefix reconstructions [G, B, m, d] (with b_dec); aux_term:
    the AuxK term [] of the full reconstruction's stopped residual [B, m, d]."""
    prefix_mse = jnp.stack([squared_error(x, prefix[g], weights) for g in range(len(prefix))])
    x_hat = prefix[-1]
    residual = jax.lax.stop_gradient(x - x_hat)
    aux = aux_term(residual)
    loss = prefix_mse.sum() + aux_coeff * aux
    out = {"f": f, "x_hat": x_hat, "mse": prefix_mse[-1], "sparsity": 0.0, "aux": aux}
    out["prefix_mse"] = prefix_mse
    out["batch_threshold"] = jnp.min(kept)
    check_outputs(model, x, loss, out)
    return loss, out


def matryoshka_loss(model: Crosscoder, x, weights, k, dead, aux_k, aux_coeff, groups, k_max=None):
    """The Matryoshka loss, dense path. Arguments as `batchtopk.batchtopk_loss`, and
    `groups`: the group sizes (static, summing to n_latents). Returns (loss, aux) with
    aux["prefix_mse"] [n_groups] besides BatchTopK's keys."""
    check_inputs(model, x, weights, dead)
    pre_acts = model.pre_acts(x)
    pre = jax.nn.relu(pre_acts)
    weighted = pre * model.decoder_norms().sum(-1) * weights[:, None]
    f = jnp.where(batch_topk(weighted, k, weights.sum(), k_max), pre, 0.0)
    fc, w = model._cast(f, model.dec_weight())  # as `Crosscoder.decode` multiplies
    h, m, d = w.shape
    w = w.reshape(h, m * d)
    parts = [
        jnp.dot(fc[:, a - n : a], w[a - n : a], preferred_element_type=jnp.float32)
        for n, a in zip(groups, _ends(groups))
    ]
    b_dec = model.b_dec[...].astype(jnp.float32)
    prefix = jnp.cumsum(jnp.stack(parts), axis=0).reshape(len(groups), -1, m, d) + b_dec
    kept = jnp.where(f > 0, weighted, jnp.inf)
    pre_acts = jax.lax.stop_gradient(pre_acts)

    def aux_term(residual):
        return auxk_pairs(model, x, pre_acts, dead, residual, weights, aux_k)

    return _result(model, x, weights, prefix, aux_term, aux_coeff, f, kept)


def matryoshka_loss_sparse(
    model: Crosscoder, x, weights, k, dead, aux_k, aux_coeff, groups, k_max=None
):
    """`matryoshka_loss` over the kept pairs only (BatchTopK's sparse selection,
    `pairs.select_pairs`); same arguments and returns."""
    check_inputs(model, x, weights, dead)
    n, n_groups = x.shape[0], len(groups)
    sel = select_pairs(model, x, weights, k, k_max, dead, aux_k)
    group = jnp.searchsorted(jnp.asarray(_ends(groups)), sel.cols, side="right")
    parts, aux_hat = decode_selection(model, sel, sel.rows * n_groups + group, n * n_groups)
    parts = parts.reshape(n, n_groups, *parts.shape[1:])
    b_dec = model.b_dec[...].astype(jnp.float32)
    prefix = jnp.moveaxis(jnp.cumsum(parts, axis=1), 1, 0) + b_dec  # [G, B, m, d]

    def aux_term(residual):
        return auxk_loss(sel, aux_hat, residual, weights)

    return _result(model, x, weights, prefix, aux_term, aux_coeff, sel.f_dense, sel.kept)


@dataclass(frozen=True)
class Matryoshka:
    """BatchTopK (k per row on average, AuxK, the EMA threshold as the inference JumpReLU)
    with every prefix of the latent groups `groups` (sizes, summing to n_latents)
    reconstructing on its own. `sparse`, `k_max`, `anneal_steps` as for `BatchTopK`."""

    k: int
    aux_k: int
    aux_coeff: float
    threshold_ema: float
    groups: tuple[int, ...]
    sparse: bool = False
    k_max: int = 0
    anneal_steps: int = 0
    name: str = NAME

    def __call__(self, model: Crosscoder, x, weights, step, dead):
        paths = (matryoshka_loss, matryoshka_loss_sparse)
        return topk_step(self, paths, model, x, weights, step, dead, self.groups)

    # BatchTopK's: the EMA of the batch's cut, its JumpReLU encoder and exported threshold.
    update = BatchTopK.update
    encode = BatchTopK.encode
    threshold_on_f = BatchTopK.threshold_on_f


def from_config(cc, tc) -> Matryoshka:
    """The loss object of `config.crosscoder` (cc): BatchTopK's fields and path
    (`batchtopk.from_config`), and the groups of `crosscoder.group_fractions`."""
    b = batchtopk.from_config(cc, tc)
    groups = group_sizes(cc.get("group_fractions", DEFAULT_FRACTIONS), cc.n_latents)
    return Matryoshka(
        b.k, b.aux_k, b.aux_coeff, b.threshold_ema, groups, b.sparse, b.k_max, b.anneal_steps
    )
