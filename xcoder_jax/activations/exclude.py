"""Positions the crosscoder never sees: the first n of every document, and chosen tokens.

Extraction does not store them (config `extract.exclude_first`, `exclude_special`,
`exclude_tokens`), and the store's manifest records what was left out ("exclude"). Every
stage that reads stored rows (training, the analysis pass, latent selection) therefore never
counts them; the stages that run the HF models on whole documents ask `Exclusion.keep`
where to intervene and where to measure (splice-in, the ablation probe). A store written
before this field existed excluded its first `first_position` positions and no token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xcoder_jax.errors import ConfigError


@dataclass(frozen=True)
class Exclusion:
    """first: positions < first of every document are left out (1: the attention sink, the
    BOS token where the tokenizer adds one); token_ids: tokens left out wherever they occur;
    tokens: their strings, for whoever reads the manifest."""

    first: int = 1
    token_ids: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()

    def keep(self, ids):
        """ids: token ids [..., T] (NumPy or torch) -> bool [..., T], True where stored."""
        if isinstance(ids, torch.Tensor):
            pos = torch.arange(ids.shape[-1], device=ids.device)
            kept = (pos >= self.first).expand(ids.shape).clone()
            if self.token_ids:
                excluded = torch.tensor(self.token_ids, device=ids.device, dtype=ids.dtype)
                kept &= ~torch.isin(ids, excluded)
            return kept
        ids = np.asarray(ids)
        kept = np.broadcast_to(np.arange(ids.shape[-1]) >= self.first, ids.shape).copy()
        if self.token_ids:
            kept &= ~np.isin(ids, self.token_ids)
        return kept

    def manifest_entry(self) -> dict:
        return {"first": self.first, "token_ids": list(self.token_ids), "tokens": list(self.tokens)}

    def fingerprint(self) -> dict:
        """The extraction fingerprint's entry. The two settings that existed before tokens
        could be excluded keep their old entry, so stores made then stay complete."""
        if not self.token_ids and self.first in (0, 1):
            return {"drop_first": self.first == 1}
        return {"exclude": self.manifest_entry()}

    @classmethod
    def from_manifest(cls, manifest: dict) -> Exclusion:
        entry = manifest.get("exclude")
        if entry is None:
            return cls(first=int(manifest.get("first_position", 1)))
        return cls(int(entry["first"]), tuple(entry["token_ids"]), tuple(entry["tokens"]))

    @classmethod
    def from_config(cls, extract_config, tokenizer) -> Exclusion:
        """From `extract.exclude_*`; raises ConfigError for a named token that is not one
        token of `tokenizer` (it could not be found as one row)."""
        first = int(extract_config.exclude_first)
        if first < 0:
            raise ConfigError(f"extract.exclude_first must be >= 0, got {first}")
        ids: dict[int, str] = {}
        if extract_config.exclude_special:
            special = set(tokenizer.all_special_ids)
            special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            ids.update((i, tokenizer.convert_ids_to_tokens(i)) for i in special)
        for text in extract_config.exclude_tokens:
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) != 1:
                raise ConfigError(
                    f"extract.exclude_tokens: {text!r} is not one token of the tokenizer "
                    f"(it encodes to {enc}); only single tokens can be left out"
                )
            ids[enc[0]] = text
        order = sorted(ids)
        return cls(first, tuple(order), tuple(ids[i] for i in order))
