"""One streaming pass over the activation store that gathers every per-latent statistic.

Each batch of rows is encoded once (PyTorch matmuls on the raw-unit export: on CPU they beat
a jitted JAX encode here because the latent-major layout feeds `torch.topk` directly), and
the batch's activations feed, in turn: the running top-k (all shards), firing counts (all
shards, and the held-out shards separately), activation counts on marker positions, and on
the held-out shards the reconstruction error (FVE) and the latent-scaling sums. Memory is one
shard of activations plus one `[n_latents, batch_rows]` block of latent activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import torch
from tqdm.auto import tqdm

from xcoder_jax.analysis.browser import ActivationHistogram
from xcoder_jax.analysis.categories import ANCHOR, marker_rows
from xcoder_jax.analysis.examples import RunningTopK
from xcoder_jax.analysis.scaling import LatentScaling
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.lexicon import marker_carry, stretches

# Above this share of nonzero latent activations a batch is handled densely.
SPARSE_DENSITY = 0.05


def to_float32(acts: np.ndarray) -> np.ndarray:
    """Store activations (bfloat16, float16 or float32) as float32 [rows, m, d].

    bfloat16 is the top half of a float32, so a shift of its bits converts it exactly and
    much faster than a per-element cast.
    """
    if acts.dtype == ml_dtypes.bfloat16:
        bits = np.ascontiguousarray(acts).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.asarray(acts, np.float32)


@dataclass
class ScanResult:
    """What one pass over the store leaves. Counts are int64, sums float64."""

    top_values: np.ndarray  # [h, k] largest activations, descending (0 where none)
    top_rows: np.ndarray  # [h, k] their global rows (-1 where none)
    fire_count: np.ndarray  # [h] rows with f > 0, whole store
    fire_heldout: np.ndarray  # [h] rows with f > 0, held-out shards
    heldout_rows: int
    l0_sum: int  # active latents summed over held-out rows
    sq_err: np.ndarray  # [m] sum of ||x - x_hat||^2 over held-out rows, raw units
    group_rows: np.ndarray  # [G] marker occurrences per group (whole store)
    group_fire: np.ndarray  # [G, h] occurrences on which each latent fires
    group_act: np.ndarray  # [G, h] activation summed over the occurrences
    skipped_rows: int  # non-finite rows left out
    scaling: dict = field(default_factory=dict)


def scan_store(
    store,
    encoder: ExportedCrosscoder,
    groups: list[list[tuple[int, ...]]],
    heldout: set[int],
    top_k: int,
    batch_rows: int,
    scaling: LatentScaling | None = None,
    progress: bool = True,
    hist: ActivationHistogram | None = None,
) -> ScanResult:
    """Streams every shard of `store` once; see the module docstring.

    groups: marker groups, each a list of token-id sequences; a row belongs to a group where
    one of its sequences ends (the position at which the whole marker has been read: the
    lexicon's "read" anchor, `categories.ANCHOR`).
    heldout: shard ids of the held-out slice (firing frequency, FVE, latent scaling).
    hist: filled with every nonzero activation of the whole store, when given.
    """
    h, m = encoder.n_latents, encoder.n_models
    topk = RunningTopK(h, top_k)
    fire_count = torch.zeros(h, dtype=torch.int64)
    fire_heldout = torch.zeros(h, dtype=torch.int64)
    n_groups = len(groups)
    group_fire = torch.zeros(n_groups, h, dtype=torch.float64)
    group_act = torch.zeros(n_groups, h, dtype=torch.float64)
    group_rows = np.zeros(n_groups, np.int64)
    sq_err = torch.zeros(m, dtype=torch.float64)
    heldout_rows = l0_sum = skipped = 0
    carry = marker_carry([s for g in groups for s in g], ANCHOR)
    prev_tokens = np.zeros(0, np.int64)
    prev_index = np.zeros((0, 2), np.int64)
    bar = tqdm(total=store.n_rows, desc="analysis scan", unit="row", disable=not progress)
    with torch.inference_mode():
        for k, acts in store.iter_shards():
            base_row = int(store.shard_offsets[k])
            tokens = np.asarray(store.shard_tokens(k), np.int64)
            index = np.asarray(store.shard_index(k), np.int64)  # (document, position)
            # Group membership of this shard's rows: [G, rows] bool.
            member = np.zeros((n_groups, len(tokens)), bool)
            ctx_tokens = np.concatenate([prev_tokens, tokens])
            # Runs of consecutive stored tokens: no marker spans an excluded token.
            ctx_docs = stretches(np.concatenate([prev_index, index]))
            for g, seqs in enumerate(groups):
                member[g, marker_rows(ctx_tokens, ctx_docs, seqs, len(prev_tokens))] = True
            group_rows += member.sum(1)
            prev_tokens, prev_index = tokens[len(tokens) - carry :], index[len(index) - carry :]
            is_heldout = k in heldout
            acts = to_float32(acts)
            shard_finite = np.isfinite(acts).all((1, 2))
            for lo in range(0, len(tokens), batch_rows):
                hi = min(lo + batch_rows, len(tokens))
                x = torch.from_numpy(acts[lo:hi])
                finite = torch.from_numpy(shard_finite[lo:hi])
                all_finite = bool(finite.all())
                if not all_finite:
                    skipped += int((~finite).sum())
                    x = torch.where(finite[:, None, None], x, torch.zeros(()))
                f_t = encoder.encode_t(x)
                if not all_finite:
                    f_t *= finite[None, :].float()
                rows = torch.arange(base_row + lo, base_row + hi)
                nnz = int(torch.count_nonzero(f_t))
                if nnz <= SPARSE_DENSITY * f_t.numel():
                    # Trained dictionaries are sparse: work on the nonzero entries only.
                    latent, col = f_t.nonzero(as_tuple=True)
                    topk.update_sparse(latent, f_t[latent, col], rows[col])
                    fired_per_latent = torch.bincount(latent, minlength=h)
                else:
                    topk.update(f_t, rows)
                    fired_per_latent = f_t.sign().sum(1).long()  # f >= 0, so sign is 0/1
                    if hist is not None:
                        latent, col = f_t.nonzero(as_tuple=True)
                if hist is not None:
                    hist.update(latent, f_t[latent, col])
                fire_count += fired_per_latent
                sel = np.flatnonzero(member[:, lo:hi].any(0))
                if len(sel):
                    mem = torch.from_numpy(member[:, lo + sel].astype(np.float32))  # [G, s]
                    f_sel = f_t[:, torch.from_numpy(sel)]  # [h, s]
                    # float32 within a batch (counts < 2^24 are exact), float64 across.
                    group_fire += (mem @ (f_sel > 0).float().T).double()
                    group_act += (mem @ f_sel.T).double()
                if is_heldout:
                    x_hat = encoder.decode_t(f_t)
                    keep = finite.double()
                    err = (x - x_hat).square().sum(2).double()  # [batch, m]
                    sq_err += (err * keep[:, None]).sum(0)
                    fire_heldout += fired_per_latent
                    l0_sum += nnz
                    heldout_rows += int(finite.sum())
                    if scaling is not None:
                        scaling.update(f_t, x, x_hat)
                bar.update(hi - lo)
    bar.close()
    values, rows = topk.result()
    return ScanResult(
        top_values=values,
        top_rows=rows,
        fire_count=fire_count.numpy(),
        fire_heldout=fire_heldout.numpy(),
        heldout_rows=heldout_rows,
        l0_sum=l0_sum,
        sq_err=sq_err.numpy(),
        group_rows=group_rows,
        group_fire=group_fire.numpy(),
        group_act=group_act.numpy(),
        skipped_rows=skipped,
    )
