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

import numpy as np
import torch
from tqdm.auto import tqdm

from xcoder_jax.analysis.categories import ANCHOR, marker_rows
from xcoder_jax.analysis.examples import RunningTopK
from xcoder_jax.analysis.histogram import ActivationHistogram
from xcoder_jax.analysis.scaling import LatentScaling
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.lexicon import marker_carry, stretches
from xcoder_jax.stage_inputs import to_float32

# Above this share of nonzero latent activations a batch is handled densely.
SPARSE_DENSITY = 0.05


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
    *,
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
    acc = _Accumulator(encoder, n_groups=len(groups), top_k=top_k, scaling=scaling, hist=hist)
    markers = _MarkerRows(groups)
    bar = tqdm(total=store.n_rows, desc="analysis scan", unit="row", disable=not progress)
    with torch.inference_mode():
        for k, acts in store.iter_shards():
            base_row = int(store.shard_offsets[k])
            tokens = np.asarray(store.shard_tokens(k), np.int64)
            index = np.asarray(store.shard_index(k), np.int64)  # (document, position)
            member = markers.shard(tokens, index)  # [G, rows] bool
            acc.group_rows += member.sum(1)
            acts = to_float32(acts)
            finite = np.isfinite(acts).all((1, 2))
            for lo in range(0, len(tokens), batch_rows):
                hi = min(lo + batch_rows, len(tokens))
                rows = torch.arange(base_row + lo, base_row + hi)
                acc.add(acts[lo:hi], finite[lo:hi], rows, member[:, lo:hi], heldout=k in heldout)
                bar.update(hi - lo)
    bar.close()
    return acc.result()


class _MarkerRows:
    """Group membership of each shard's rows, with the last rows of the previous shard
    carried over so that a marker split across two shards is still found. Runs of
    consecutive stored tokens: no marker spans an excluded token."""

    def __init__(self, groups: list[list[tuple[int, ...]]]):
        self.groups = groups
        self.carry = marker_carry([s for g in groups for s in g], ANCHOR)
        self.prev_tokens = np.zeros(0, np.int64)
        self.prev_index = np.zeros((0, 2), np.int64)

    def shard(self, tokens: np.ndarray, index: np.ndarray) -> np.ndarray:
        """[G, rows] bool: the groups whose markers are read at each row of the shard."""
        member = np.zeros((len(self.groups), len(tokens)), bool)
        ctx_tokens = np.concatenate([self.prev_tokens, tokens])
        ctx_docs = stretches(np.concatenate([self.prev_index, index]))
        for g, seqs in enumerate(self.groups):
            member[g, marker_rows(ctx_tokens, ctx_docs, seqs, len(self.prev_tokens))] = True
        self.prev_tokens = tokens[len(tokens) - self.carry :]
        self.prev_index = index[len(index) - self.carry :]
        return member


class _Accumulator:
    """The running sums of `ScanResult`, fed one batch of rows at a time."""

    def __init__(self, encoder, *, n_groups: int, top_k: int, scaling, hist):
        h, m = encoder.n_latents, encoder.n_models
        self.encoder, self.scaling, self.hist = encoder, scaling, hist
        self.topk = RunningTopK(h, top_k)
        self.fire_count = torch.zeros(h, dtype=torch.int64)
        self.fire_heldout = torch.zeros(h, dtype=torch.int64)
        self.group_fire = torch.zeros(n_groups, h, dtype=torch.float64)
        self.group_act = torch.zeros(n_groups, h, dtype=torch.float64)
        self.group_rows = np.zeros(n_groups, np.int64)
        self.sq_err = torch.zeros(m, dtype=torch.float64)
        self.heldout_rows = self.l0_sum = self.skipped = 0

    def add(self, acts, finite, rows, member, *, heldout: bool) -> None:
        """acts: [batch, m, d] float32 raw; finite: [batch] bool (non-finite rows count as
        silent); rows: [batch] global row ids; member: [G, batch] bool; heldout: the batch
        lies in a held-out shard."""
        x = torch.from_numpy(acts)
        finite = torch.from_numpy(finite)
        all_finite = bool(finite.all())
        if not all_finite:
            self.skipped += int((~finite).sum())
            x = torch.where(finite[:, None, None], x, torch.zeros(()))
        f_t = self.encoder.encode_t(x)
        if not all_finite:
            f_t *= finite[None, :].float()
        nnz = int(torch.count_nonzero(f_t))
        fired = self._top_and_firing(f_t, rows, nnz)
        self.fire_count += fired
        sel = np.flatnonzero(member.any(0))
        if len(sel):
            mem = torch.from_numpy(member[:, sel].astype(np.float32))  # [G, s]
            f_sel = f_t[:, torch.from_numpy(sel)]  # [h, s]
            # float32 within a batch (counts < 2^24 are exact), float64 across.
            self.group_fire += (mem @ (f_sel > 0).float().T).double()
            self.group_act += (mem @ f_sel.T).double()
        if heldout:
            x_hat = self.encoder.decode_t(f_t)
            keep = finite.double()
            err = (x - x_hat).square().sum(2).double()  # [batch, m]
            self.sq_err += (err * keep[:, None]).sum(0)
            self.fire_heldout += fired
            self.l0_sum += nnz
            self.heldout_rows += int(finite.sum())
            if self.scaling is not None:
                self.scaling.update(f_t, x, x_hat)

    def _top_and_firing(self, f_t: torch.Tensor, rows: torch.Tensor, nnz: int) -> torch.Tensor:
        """Feeds the running top-k (and the histogram); returns the rows each latent fired on
        [h]. Trained dictionaries are sparse: a sparse batch is handled by its nonzero
        entries only."""
        if nnz <= SPARSE_DENSITY * f_t.numel():
            latent, col = f_t.nonzero(as_tuple=True)
            self.topk.update_sparse(latent, f_t[latent, col], rows[col])
            fired = torch.bincount(latent, minlength=f_t.shape[0])
        else:
            self.topk.update(f_t, rows)
            fired = f_t.sign().sum(1).long()  # f >= 0, so sign is 0/1
            latent, col = f_t.nonzero(as_tuple=True) if self.hist is not None else (None, None)
        if self.hist is not None:
            self.hist.update(latent, f_t[latent, col])
        return fired

    def result(self) -> ScanResult:
        values, rows = self.topk.result()
        return ScanResult(
            top_values=values,
            top_rows=rows,
            fire_count=self.fire_count.numpy(),
            fire_heldout=self.fire_heldout.numpy(),
            heldout_rows=self.heldout_rows,
            l0_sum=self.l0_sum,
            sq_err=self.sq_err.numpy(),
            group_rows=self.group_rows,
            group_fire=self.group_fire.numpy(),
            group_act=self.group_act.numpy(),
            skipped_rows=self.skipped,
        )
