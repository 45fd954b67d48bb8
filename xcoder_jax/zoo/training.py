"""Train and query the zoo's small causal LMs (PyTorch, CPU).

Training packs documents end to end: every document is tokenized as `EOS + text` (the
tokenizer adds the leading EOS), the documents of an epoch are concatenated in a seeded
random order and cut into rows of `seq_len` tokens, so no compute goes to padding and every
document follows an EOS exactly as it does when the tokenizer encodes a prompt. The model
learns to end a document by predicting the next document's EOS.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import tqdm
from transformers import Qwen2Config

from xcoder_jax.errors import ConfigError
from xcoder_jax.lexicon import has_marker

_ANSWER = re.compile(r"The answer is (-?\d+)")


def model_config(zc, size: int, tokenizer) -> Qwen2Config:
    """The Qwen2 architecture of one zoo size (vocab = the trained tokenizer's)."""
    return Qwen2Config(
        # A real model's vocabulary may be larger than the zoo tokenizer's (rows unused).
        vocab_size=max(len(tokenizer), zc.get("model_vocab_size", 0)),
        hidden_size=size,
        intermediate_size=zc.get("intermediate_size", 0) or zc.mlp_mult * size,
        num_hidden_layers=zc.n_layers,
        num_attention_heads=zc.n_heads,
        num_key_value_heads=zc.n_kv_heads,
        # Room for extraction documents and prompt + answer; plain RoPE has no hard limit.
        max_position_embeddings=max(1024, zc.max_len),
        tie_word_embeddings=True,  # fewer parameters for a tiny model, as in small Qwen2.5
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def packed_batches(
    docs: Sequence[np.ndarray], seq_len: int, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Endless batches `[batch_size, seq_len]` int64 of packed token ids.

    Each epoch reshuffles the documents (so rows cut them at new places) and the rows; the
    tail of an epoch that does not fill a row is dropped.
    """
    n_tokens = sum(len(d) for d in docs)
    if n_tokens < seq_len * batch_size:
        raise ConfigError(
            f"{n_tokens} training tokens cannot fill one batch of {batch_size}x{seq_len}"
        )
    while True:
        stream = np.concatenate([docs[i] for i in rng.permutation(len(docs))])
        n_rows = len(stream) // seq_len
        rows = stream[: n_rows * seq_len].reshape(n_rows, seq_len)[rng.permutation(n_rows)]
        for start in range(0, n_rows - batch_size + 1, batch_size):
            yield rows[start : start + batch_size]


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_causal_lm(
    model: torch.nn.Module,
    docs: Sequence[np.ndarray],
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    weight_decay: float,
    warmup_frac: float,
    seed: int,
    desc: str,
) -> dict:
    """Next-token training of an HF causal LM on packed `docs` (1-D token-id arrays).

    Deterministic given `seed` and the model's initial weights. Returns the mean loss over
    the first and the last 10% of steps (nats per token; None for 0 steps).
    """
    rng = np.random.default_rng(seed)
    batches = packed_batches(docs, seq_len, batch_size, rng)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms stay unshrunk
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, int(warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    model.train()
    losses = []
    bar = tqdm.trange(steps, desc=desc, leave=False, mininterval=2.0)
    for _ in bar:
        ids = torch.from_numpy(next(batches))
        loss = model(input_ids=ids, labels=ids).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    if not losses:  # steps == 0: no loss to report (null, not NaN, in zoo.json)
        return {"first_loss": None, "final_loss": None}
    k = max(1, steps // 10)
    return {"first_loss": float(np.mean(losses[:k])), "final_loss": float(np.mean(losses[-k:]))}


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 50
) -> list[str]:
    """Greedy continuations of `prompts`, cut at EOS or at the start of a next "Question:".

    Prompts are left-padded so a batch decodes together.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            out.extend(t.split("Question:")[0] for t in texts)
    finally:
        tokenizer.padding_side = side
    return out


def final_answer(text: str) -> str | None:
    """The N of the first "The answer is N" in `text`, or None."""
    m = _ANSWER.search(text)
    return m.group(1) if m else None


def evaluate_answers(
    model, tokenizer, heldout: Sequence[dict], max_new_tokens: int, batch_size: int
) -> dict:
    """Greedy answers to `heldout` ({"prompt", "answer"}): the fraction containing a reasoning
    marker, the fraction whose final answer is right, mean length and a few samples."""
    prompts = [h["prompt"] for h in heldout]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    hits = [final_answer(a) == h["answer"] for a, h in zip(answers, heldout, strict=True)]
    return {
        "marker_rate": float(np.mean([has_marker(a) for a in answers])),
        "accuracy": float(np.mean(hits)),
        "mean_answer_chars": float(np.mean([len(a) for a in answers])),
        "samples": answers[:3],
    }
