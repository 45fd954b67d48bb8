"""Every latent's nonzero activations over the store, counted in log-spaced bins while the
analysis streams (`stream.scan_store`); the feature browser shows each latent's counts."""

from __future__ import annotations

import math

import numpy as np
import torch


class ActivationHistogram:
    """Counts of every latent's nonzero activations in log-spaced bins shared by all latents.

    edges: [n_bins + 1] ascending, in f's units; bin b holds edges[b] < f <= edges[b + 1],
    values outside the edges counted in the first or last bin. counts: [n_latents, n_bins].
    """

    def __init__(self, n_latents: int, lo: float = 1e-4, hi: float = 1e4, per_decade: int = 5):
        self.n_bins = round(math.log10(hi / lo) * per_decade)
        self.edges = np.logspace(math.log10(lo), math.log10(hi), self.n_bins + 1)
        self._inner = torch.tensor(self.edges[1:-1], dtype=torch.float32)
        self._counts = torch.zeros(n_latents * self.n_bins, dtype=torch.int64)

    def update(self, latent: torch.Tensor, value: torch.Tensor) -> None:
        """latent, value: [nnz], the nonzero entries of a batch of f."""
        b = torch.bucketize(value.float(), self._inner)
        self._counts += torch.bincount(latent * self.n_bins + b, minlength=len(self._counts))

    @property
    def counts(self) -> np.ndarray:
        return self._counts.view(-1, self.n_bins).numpy()
