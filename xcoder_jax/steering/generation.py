"""The steering sweep's prompts and generation: reading the prompt file, checking prompts fit
the model's context, and drawing seeded continuations of every prompt.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError, MissingInputError


def read_prompts(path: str, limit: int = -1) -> list[dict]:
    """[{"prompt", "answer" (str or None)}] from a JSONL file of {"prompt", optional "answer"}."""
    if not os.path.exists(path):
        raise MissingInputError(f"prompt file {path} does not exist")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
                raise ConfigError(f"{path}:{n}: each line must be an object with a 'prompt'")
            answer = row.get("answer")
            rows.append(
                {"prompt": row["prompt"], "answer": None if answer is None else str(answer)}
            )
    if not rows:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return rows[:limit] if limit > 0 else rows


def prompt_path(config, workdir: str) -> str:
    sc = config.steering
    if sc.prompts:
        return sc.prompts
    if "zoo" in (config.models.base, config.models.distilled):
        return os.path.join(wd.zoo_data_dir(workdir), "heldout.jsonl")
    raise ConfigError("steering.prompts must name a JSONL file of prompts for real models")


def check_lengths(
    tokenizer, model, prompts: list[str], max_new_tokens: int, *, why: str = ""
) -> None:
    """Raises ValueError when a prompt plus the generation exceeds the model's context.

    `why`: how the generation cap was set, for the message (default: steering.max_new_tokens).
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    for i, p in enumerate(prompts):
        n = len(tokenizer(p)["input_ids"])
        if n + max_new_tokens > limit:
            raise ConfigError(
                f"prompt {i} has {n} tokens; with {max_new_tokens} new tokens it exceeds the "
                f"model's context of {limit} (shorten it or lower "
                f"{why or 'steering.max_new_tokens'})"
            )


@torch.no_grad()
def sample(
    model, tokenizer, prompts: list[str], sc, *, max_new_tokens: int | None = None
) -> list[tuple[int, int, str, int, bool]]:
    """`sc.samples` continuations of every prompt: [(prompt id, sample, text, tokens,
    truncated)].

    Prompts are left-padded and decoded `sc.batch_size` rows at a time; batch b draws with
    a seed derived from (`sc.seed`, b) whatever the intervention. At most `max_new_tokens`
    (default `sc.max_new_tokens`) tokens are drawn. Text is cut where `sc.stop` begins.
    A sample is truncated when it hit that cap: it drew `max_new_tokens` tokens without an
    end-of-text token and without reaching `sc.stop`, so its length is censored there.
    """
    cap = int(sc.max_new_tokens if max_new_tokens is None else max_new_tokens)
    rows = [(i, s) for i in range(len(prompts)) for s in range(sc.samples)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out = []
    try:
        for b, lo in enumerate(range(0, len(rows), sc.batch_size)):
            chunk = rows[lo : lo + sc.batch_size]
            enc = tokenizer([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            greedy = sc.temperature <= 0
            # One stream per (run seed, batch): runs with neighbouring seeds share none.
            seed = int(np.random.SeedSequence([sc.seed, b]).generate_state(1)[0])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if device.type == "cuda":
                    torch.cuda.manual_seed_all(seed)
                gen = model.generate(
                    **enc,
                    max_new_tokens=cap,
                    do_sample=not greedy,
                    temperature=None if greedy else sc.temperature,
                    # Plain temperature sampling, whatever the model's generation_config says.
                    top_p=None if greedy else 1.0,
                    top_k=None if greedy else 0,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            # Finished rows hold the end-of-text token (padding comes after it).
            eos_id = tokenizer.eos_token_id
            ended = [False] * len(chunk) if eos_id is None else (new == eos_id).any(1).tolist()
            for (i, s), text, eos in zip(chunk, texts, ended, strict=True):
                stopped = bool(sc.stop) and sc.stop in text
                if sc.stop:
                    text = text.split(sc.stop)[0]
                n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                hit_cap = new.shape[1] >= cap and not eos and not stopped
                out.append((i, s, text, n, bool(hit_cap)))
    finally:
        tokenizer.padding_side = side
    return out
