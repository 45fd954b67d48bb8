"""Random controls of a steered latent set: what any push of the same size, or any latent like
the steered ones, would do.

A push of 0.4 mean residual norms disturbs a small model whatever it encodes, so a steered
set is compared with two controls, each generated on the same prompts and seeds:

- `random_direction`: a Gaussian direction in d, rescaled to exactly the norm of the set's
  steering vector at that alpha (its sign follows alpha's, so -alpha pushes the opposite
  way). One direction per (model, set, draw), drawn from a seeded generator and reused at
  every alpha, as the set's own direction is.
- `random_latent`: for each latent of the set, a latent not in the set drawn among the
  `match_pool` alive latents nearest to it in (NRN, log10 firing frequency), each axis
  standardised over the alive latents; steered with the same convention and alpha and
  rescaled to the set's vector norm, so only the direction differs from the steered one.

Firing frequency: the share of store rows on which a latent fires (f > 0), read from the
analysis (`analysis/latents.jsonl`, `firing_freq_store`) when it was run on this export, or
computed from the store otherwise.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import torch

from xcoder_jax import stage
from xcoder_jax import workdir as wd
from xcoder_jax.errors import MissingInputError
from xcoder_jax.stage_inputs import to_float32

RANDOM_DIRECTION = (
    "a seeded Gaussian direction in d per (model, set, draw), reused at every alpha, scaled to "
    "sign(alpha) times the exact norm of the set's steering vector at that alpha"
)
RANDOM_LATENT = (
    "per latent of the set, one latent drawn uniformly (seeded, per draw) among the "
    "match_pool alive latents not in the set nearest to it in (NRN, log10 firing frequency), "
    "each axis standardised over alive latents; steered like the set and rescaled to the "
    "set's steering-vector norm"
)
_ANALYSIS_SUMMARY, _ANALYSIS_LATENTS = "summary.json", "latents.jsonl"
_FREQ_FLOOR = 1e-7  # log10 of a dead latent's frequency (only a steered id can be dead)


def draw_seed(seed: int, kind: str, role: str, spec: str, *, draw: int) -> np.random.SeedSequence:
    """The seed of one control draw: distinct per (run seed, control, model, set, draw)."""
    keys = [zlib.crc32(s.encode()) for s in (kind, role, spec)]
    return np.random.SeedSequence([int(seed), *keys, int(draw)])


def random_unit(d: int, seq: np.random.SeedSequence) -> torch.Tensor:
    """A uniformly random unit vector [d] (float64 Gaussian draw, normalised)."""
    u = np.random.default_rng(seq).standard_normal(d)
    return torch.from_numpy(u / np.linalg.norm(u))


def rescaled(direction: torch.Tensor, like: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """`direction` rescaled to the norm of `like` (in float64, then `like`'s dtype), times the
    sign of `sign`."""
    d = direction.to(torch.float64)
    n = float(d.norm())
    if n == 0:
        raise ValueError("cannot rescale a zero vector")
    s = -1.0 if sign < 0 else 1.0
    return (s * d * (float(like.to(torch.float64).norm()) / n)).to(like.dtype)


# --- Matched random latents ----------------------------------------------------------------


def _coords(nrn: np.ndarray, freq: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """[h, 2]: (NRN, log10 frequency), each standardised over the alive latents."""
    x = np.stack([np.asarray(nrn, np.float64), np.log10(np.maximum(freq, _FREQ_FLOOR))], 1)
    sd = x[alive].std(0) if alive.sum() > 1 else np.ones(2)
    return (x - x[alive].mean(0)) / np.where(sd > 0, sd, 1.0)


def match_latents(
    targets, nrn: np.ndarray, freq: np.ndarray, *, pool: int, rng: np.random.Generator
) -> list[int]:
    """One matched random latent per target latent (none of them a target, no repeats).

    Candidates are alive (frequency > 0, finite NRN); for each target the `pool` nearest in
    standardised (NRN, log10 frequency) are the pool (ties by id), one drawn uniformly.
    Raises ValueError when there are fewer candidates than targets.
    """
    nrn, freq = np.asarray(nrn, np.float64), np.asarray(freq, np.float64)
    alive = (freq > 0) & np.isfinite(nrn)
    z = _coords(nrn, freq, alive)
    taken = set(int(t) for t in targets)
    out = []
    for t in targets:
        cand = np.array([i for i in np.flatnonzero(alive) if int(i) not in taken], np.int64)
        if not len(cand):
            raise ValueError(f"no alive latent left to match latent {int(t)}")
        dist = np.linalg.norm(z[cand] - z[int(t)], axis=1)
        near = cand[np.lexsort((cand, dist))[: max(1, int(pool))]]
        pick = int(rng.choice(near))
        taken.add(pick)
        out.append(pick)
    return out


# --- Firing frequencies --------------------------------------------------------------------


def _analysis_summary(workdir: str) -> dict | None:
    path = os.path.join(wd.stage_dir(workdir, "analysis"), _ANALYSIS_SUMMARY)
    if not os.path.exists(os.path.join(wd.stage_dir(workdir, "analysis"), _ANALYSIS_LATENTS)):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    fp = summary.get("fingerprint") or {}
    # Only an analysis of this very export describes its latents.
    return summary if fp.get("export") == stage.export_hash(workdir) else None


def frequencies_from_analysis(workdir: str) -> np.ndarray | None:
    """[h] `firing_freq_store` of `analysis/latents.jsonl`, when the analysis ran on this
    very export (its fingerprint names the export's hashes); None otherwise."""
    if _analysis_summary(workdir) is None:
        return None
    with open(os.path.join(wd.stage_dir(workdir, "analysis"), _ANALYSIS_LATENTS)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    freq = np.full(len(rows), np.nan)
    for row in rows:
        if 0 <= int(row["id"]) < len(rows):
            freq[int(row["id"])] = float(row["firing_freq_store"])
    return freq if len(freq) and np.isfinite(freq).all() else None


def frequencies_from_store(store, xcoder, block: int = 4096) -> np.ndarray:
    """[h]: share of all store rows on which each latent fires (f > 0), `block` rows at a
    time."""
    h = xcoder.n_latents
    fired, rows = np.zeros(h, np.int64), 0
    ids = list(range(h))
    with torch.no_grad():
        for k in range(len(store.shards)):
            acts = to_float32(store.shard_acts(k))
            for lo in range(0, len(acts), block):
                x = torch.from_numpy(acts[lo : lo + block]).to(xcoder.W_enc.device)
                fired += (xcoder.latent_acts(x, ids) > 0).sum(0).cpu().numpy()
            rows += len(acts)
    return fired / max(rows, 1)


def firing_frequencies(workdir: str, load_xcoder, open_store) -> tuple[np.ndarray, dict]:
    """([h] firing frequencies, how they were obtained, for the fingerprint).

    From the analysis of this export when there is one (no scan); else computed from the
    store `open_store()` returns with the crosscoder `load_xcoder()` returns. The fingerprint
    part holds the values' digest, not the analysis' settings: steering depends on the
    numbers only.
    """
    freq, source = frequencies_from_analysis(workdir), "analysis/latents.jsonl"
    if freq is None:
        try:
            store = open_store()
        except (OSError, ValueError) as e:
            raise MissingInputError(
                "the random-latent control needs firing frequencies: run the analysis on "
                f"this export, or keep its activation store ({e})"
            ) from e
        freq, source = frequencies_from_store(store, load_xcoder()), "store"
    return freq, {"source": source, "sha256": stage.digest(np.round(freq, 9).tolist())}
