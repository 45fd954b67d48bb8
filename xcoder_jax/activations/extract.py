"""Extraction: both models over the same documents in one pass, block-L inputs to a store.

    extract(config, workdir)                            # one process
    extract(config, workdir, shard_index=k, num_shards=n); merge(config, workdir, n)

Rows are the input of block L (see `xcoder_jax.site`) at every position of every document
but the excluded ones (`exclude.Exclusion`: position 0 by default), in raw model units. An
interrupted extraction resumes from the last shard on disk; a complete store with the same
settings is left as it is.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from xcoder_jax import site
from xcoder_jax import workdir as wd
from xcoder_jax.activations import budget
from xcoder_jax.activations import manifest as mf
from xcoder_jax.activations import models as pair
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.activations.sources import iter_documents
from xcoder_jax.activations.writer import StoreWriter, merge_parts
from xcoder_jax.errors import ConfigError


def part_dir(workdir: str, shard_index: int, num_shards: int) -> str:
    """Where process `shard_index` of `num_shards` writes its part of the store."""
    if num_shards == 1:
        return wd.activations_dir(workdir)
    return os.path.join(wd.activations_dir(workdir), f"part-{shard_index:03d}-of-{num_shards:03d}")


def _plain(obj):
    """A ConfigDict (possibly holding lists of ConfigDicts) as plain JSON-able values."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _pair_facts(config, workdir: str) -> dict:
    """Sources, tokenizers, layer and d_model of the pair, checked, without loading weights."""
    from transformers import AutoConfig

    sources = {r: pair.model_source(config, workdir, r) for r in pair.ROLES}
    for role, (path, _) in sources.items():
        if config.models[role] == "zoo" and not os.path.isdir(path):
            raise pair.PairError(
                f"zoo model {path} is missing; build the zoo first (launch/build_zoo.py)"
            )
    tokenizers = {r: pair.load_tokenizer(p, rev) for r, (p, rev) in sources.items()}
    tok_hash = pair.check_same_tokenizer(tokenizers)
    cfgs = {}
    for role, (path, rev) in sources.items():
        try:
            cfgs[role] = AutoConfig.from_pretrained(path, revision=rev)
        except (OSError, ValueError) as e:
            raise pair.PairError(
                f"cannot load the model config of {path!r}: {str(e).splitlines()[0]}"
            ) from e
    n_layers = {r: c.num_hidden_layers for r, c in cfgs.items()}
    layers = {r: site.resolve_layer(config.extract.layer, n) for r, n in n_layers.items()}
    d_models = {r: c.hidden_size for r, c in cfgs.items()}
    if len(set(layers.values())) > 1 or len(set(d_models.values())) > 1:
        raise pair.PairError(
            f"the models differ in block L or d_model: layers {layers}, d_model {d_models}"
        )
    return {
        "sources": sources,
        "tokenizer": tokenizers["base"],
        "tokenizer_sha256": tok_hash,
        "layer": layers["base"],
        "n_layers": n_layers["base"],
        "d_model": d_models["base"],
    }


def _fingerprint(
    config, facts: dict, shard_index: int, num_shards: int, exclusion: Exclusion
) -> dict:
    models = [
        {"role": r, "source": p, "revision": rev, "weights": pair.weights_fingerprint(p, rev)}
        for r, (p, rev) in facts["sources"].items()
    ]
    fp = {
        "models": models,
        "tokenizer_sha256": facts["tokenizer_sha256"],
        "layer": facts["layer"],
        **exclusion.fingerprint(),
        "dtype": config.extract.dtype,
        "shard_rows": int(config.extract.shard_rows),
        "torch_dtype": config.models.torch_dtype,
        "data": _plain(config.data),
        "shard_index": shard_index,
        "num_shards": num_shards,
    }
    if config.extract.get("max_rows", -1) >= 0:  # only when set: older stores keep theirs
        fp["max_rows"] = int(config.extract.max_rows)
    return fp


def _to_store_dtype(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    """Rounds to the store's dtype on the model's device (half the bytes to move and buffer;
    torch and ml_dtypes both round to nearest even, so the values are those np would give)."""
    if dtype == "bfloat16":
        bits = hidden.to(torch.bfloat16).cpu().view(torch.int16).numpy()
        return bits.view(mf.DTYPES["bfloat16"][0])
    return hidden.to(getattr(torch, dtype)).cpu().numpy()


def _batches(docs, size: int):
    it = iter(docs)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _finished_manifest(directory: str, fingerprint: dict) -> dict | None:
    """The manifest of a complete store in `directory` made with `fingerprint` (nothing to
    do), None when the store is absent or unfinished; StoreError for a complete store made
    with other settings."""
    if not os.path.exists(os.path.join(directory, mf.MANIFEST)):
        return None
    manifest = mf.read_manifest(directory)
    same = mf.portable(manifest.get("fingerprint")) == mf.portable(fingerprint)
    if manifest.get("complete") and same:
        return manifest
    if manifest.get("complete"):
        raise mf.StoreError(
            f"{directory} holds a complete store made with other settings; remove it or "
            "use another workdir"
        )
    return None


def _documents(
    config,
    workdir: str,
    facts: dict,
    exclusion: Exclusion,
    directory: str,
    shard_index: int,
    num_shards: int,
):
    """This process's documents, (doc id, token ids [n] int), capped at `extract.max_rows`
    rows, once the disk is known to hold their rows (beside the shards already written)."""
    max_rows = int(config.extract.get("max_rows", -1))

    def share():  # a fresh pass over this process's documents
        docs = (
            d
            for d in iter_documents(config.data, workdir, facts["tokenizer"])
            if d[0] % num_shards == shard_index
        )
        return budget.cap_rows(docs, max_rows, exclusion.keep)

    existing = os.path.join(directory, mf.MANIFEST)
    done = mf.read_manifest(directory).get("shards", []) if os.path.exists(existing) else []
    budget.check_disk(
        share(),
        exclusion.keep,
        len(facts["sources"]),
        facts["d_model"],
        config.extract.dtype,
        directory,
        rows_on_disk=sum(s["rows"] for s in done),
    )
    docs = share()
    first = next(docs, None)
    if first is None:
        raise ConfigError("the corpus gave no documents (after the length filter and sharding)")
    return itertools.chain([first], docs)


def _open_writer(
    config, directory: str, facts: dict, fingerprint: dict, exclusion: Exclusion
) -> StoreWriter:
    """The store's writer, resuming after the rows already on disk."""
    return StoreWriter(
        directory,
        n_models=len(facts["sources"]),
        d_model=facts["d_model"],
        dtype=config.extract.dtype,
        shard_rows=int(config.extract.shard_rows),
        fingerprint=fingerprint,
        meta={
            "layer": facts["layer"],
            "n_layers": facts["n_layers"],
            "first_position": exclusion.first,
            "exclude": exclusion.manifest_entry(),
            "tokenizer_sha256": facts["tokenizer_sha256"],
            "models": fingerprint["models"],
        },
    )


def _site_inputs(models, layer: int, batch, pad_id: int, device, dtype: str) -> np.ndarray:
    """The block-`layer` inputs of every model for a batch of (doc id, token ids), right-padded
    with `pad_id`: [n_models, batch, seq, d] raw units, already rounded to the store's
    `dtype`."""
    lengths = [len(ids) for _, ids in batch]
    input_ids = np.full((len(batch), max(lengths)), pad_id, np.int64)
    mask = np.zeros_like(input_ids)
    for i, (_, ids) in enumerate(batch):
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    input_ids_t = torch.from_numpy(input_ids).to(device)
    mask_t = torch.from_numpy(mask).to(device)
    return np.stack(
        [
            _to_store_dtype(site.forward_to_site(m, layer, input_ids_t, mask_t), dtype)
            for m in models
        ]
    )


def extract(config, workdir: str, shard_index: int = 0, num_shards: int = 1) -> dict:
    """Extracts this process's share of the documents; returns the finished manifest."""
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    facts = _pair_facts(config, workdir)
    exclusion = Exclusion.from_config(config.extract, facts["tokenizer"])
    fingerprint = _fingerprint(config, facts, shard_index, num_shards, exclusion)
    directory = part_dir(workdir, shard_index, num_shards)
    finished = _finished_manifest(directory, fingerprint)
    if finished is not None:
        return finished
    docs = _documents(config, workdir, facts, exclusion, directory, shard_index, num_shards)
    device = pair.torch_device(config.models.device)
    models = [
        pair.load_model(p, rev, config.models.torch_dtype, device)
        for p, rev in facts["sources"].values()
    ]
    writer = _open_writer(config, directory, facts, fingerprint, exclusion)
    tokenizer = facts["tokenizer"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    resume_doc = writer.resume_point[0] if writer.resume_point else -1
    bar = tqdm(desc=f"extract {os.path.basename(directory)}", unit="doc")
    for batch in _batches(docs, int(config.extract.batch_size)):
        bar.update(len(batch))
        if max(doc for doc, _ in batch) < resume_doc:
            continue
        # The batch that holds the resume point runs whole, as in an uninterrupted run:
        # another batch composition (padding, GEMM shapes) could round some values
        # differently. The writer drops the rows it already has.
        hidden = _site_inputs(models, facts["layer"], batch, pad_id, device, config.extract.dtype)
        for i, (doc, ids) in enumerate(batch):
            pos = np.flatnonzero(exclusion.keep(ids))
            writer.add(hidden[:, i, pos].transpose(1, 0, 2), ids[pos], doc, pos)
        bar.set_postfix(rows=writer.rows_written)
    bar.close()
    return writer.close()


def merge(config, workdir: str, num_shards: int) -> dict:
    """Joins the `num_shards` parts under `activations/` into one store manifest there."""
    parts = [part_dir(workdir, k, num_shards) for k in range(num_shards)]
    for p in parts:
        if not os.path.exists(os.path.join(p, mf.MANIFEST)):
            raise mf.StoreError(f"cannot merge: part {p} has not been extracted")
    return merge_parts(parts, wd.activations_dir(workdir))
