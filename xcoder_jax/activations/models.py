"""Loading the model pair for extraction, with the checks that make a pair comparable.

Both models must read the same token ids (their tokenizers' vocabularies and merges are
compared; differing special/added tokens, as between Qwen2.5-Math and R1-Distill-Qwen, are
allowed), have a block L, and share d_model.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import torch

from xcoder_jax import workdir as wd
from xcoder_jax.errors import XcoderError

ROLES = wd.ROLES


class PairError(XcoderError, ValueError):
    """The two models cannot be diffed (tokenizers, shapes or paths do not match)."""


def model_source(config, workdir: str, role: str) -> tuple[str, str | None]:
    """(path or hub id, revision) of one model of the pair; "zoo" means the embedded pair."""
    name = config.models[role]
    if name == "zoo":
        return wd.model_dir(workdir, role), None
    return name, config.models.get(f"{role}_revision")


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise PairError(f"cannot load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from e


def load_model(path: str, revision: str | None, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=getattr(torch, dtype)
        )
    except (OSError, ValueError) as e:
        raise PairError(f"cannot load the model {path!r}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's base vocabulary and merges (added tokens excluded)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    blob = json.dumps({"vocab": spec.get("vocab"), "merges": spec.get("merges")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_same_tokenizer(tokenizers: dict[str, object]) -> str:
    """Raises PairError unless every tokenizer has the same vocabulary and merges."""
    prints = {role: tokenizer_fingerprint(t) for role, t in tokenizers.items()}
    if len(set(prints.values())) > 1:
        raise PairError(
            "the models' tokenizers differ (vocabulary or merges): "
            + ", ".join(f"{r}={p[:12]}" for r, p in prints.items())
            + "; a crosscoder needs both models to read the same tokens"
        )
    return next(iter(prints.values()))


def weights_fingerprint(path: str, revision: str | None) -> str:
    """sha256 over a local model's weight files; for a hub id, the id and revision."""
    files = sorted(
        glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin"))
    )
    if not os.path.isdir(path) or not files:
        return f"{path}@{revision or 'default'}"
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def load_pair(config, workdir: str, roles: list[str]):
    """(models in crosscoder order, tokenizer); the tokenizers must agree."""
    device = torch_device(config.models.device)
    models, tokenizers = [], {}
    for role in roles:
        path, rev = model_source(config, workdir, role)
        tokenizers[role] = load_tokenizer(path, rev)
        models.append(load_model(path, rev, config.models.torch_dtype, device))
    check_same_tokenizer(tokenizers)
    return models, tokenizers[roles[0]]
