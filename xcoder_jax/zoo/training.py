"""Train the zoo's small causal LMs (PyTorch, CPU); `zoo.evaluation` queries them.

Training packs documents end to end: every document is tokenized as `EOS + text` (the
tokenizer adds the leading EOS), the documents of an epoch are concatenated in a seeded
random order and cut into rows of `seq_len` tokens, so no compute goes to padding and every
document follows an EOS exactly as it does when the tokenizer encodes a prompt. The model
learns to end a document by predicting the next document's EOS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import tqdm
from transformers import Qwen2Config

from xcoder_jax.errors import ConfigError


def depth(zc, size: int) -> int:
    """Layers of the zoo model of hidden size `size` (`zoo.depths`, else `zoo.n_layers`)."""
    depths = tuple(zc.get("depths", ()))
    return depths[tuple(zc.sizes).index(size)] if depths else zc.n_layers


def model_config(zc, size: int, tokenizer) -> Qwen2Config:
    """The Qwen2 architecture of one zoo size (vocab = the trained tokenizer's)."""
    return Qwen2Config(
        # A real model's vocabulary may be larger than the zoo tokenizer's (rows unused).
        vocab_size=max(len(tokenizer), zc.get("model_vocab_size", 0)),
        hidden_size=size,
        intermediate_size=zc.get("intermediate_size", 0) or zc.mlp_mult * size,
        num_hidden_layers=depth(zc, size),
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


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Warmup-stable-decay: linear warmup to the peak lr, the peak until the held-out loss
    stops improving (or for `stable_steps` when given), then a linear decay to 10% of the
    peak over `decay_frac` of the steps before it. A run of unknown length can end at its own
    plateau and still anneal; a second run given the first's `stable_steps` repeats its
    exact lr curve (the sham arm, matched to distillation step for step).

    `max_steps` bounds the whole run, decay included.
    """

    max_steps: int
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    stable_steps: int | None = None  # None: until the held-out loss plateaus
    eval_every: int = 50  # held-out loss every this many steps (adaptive runs)
    patience: int = 3  # evaluations without a `tol` relative improvement end the stable phase
    tol: float = 0.01

    @property
    def warmup(self) -> int:
        return max(1, int(self.warmup_frac * self.max_steps))

    def decay_steps(self, stable_end: int) -> int:
        return max(1, math.ceil(self.decay_frac * stable_end))

    @property
    def max_stable(self) -> int:
        """The last step the stable phase may reach and still decay within `max_steps`."""
        s = math.floor(self.max_steps / (1 + self.decay_frac))
        while s > 1 and s + self.decay_steps(s) > self.max_steps:
            s -= 1
        return max(1, s)

    def factor(self, step: int, stable_end: int | None) -> float:
        """lr / peak at `step` (0-based); `stable_end` None while the stable phase lasts."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if stable_end is None or step < stable_end:
            return 1.0
        # The decay's last step (stable_end + decay - 1) runs at exactly 10% of the peak.
        progress = (step - stable_end + 1) / self.decay_steps(stable_end)
        return max(0.1, 1.0 - 0.9 * progress)


def held_out_loss(model, rows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss (nats per token) of `model` on fixed `[n, seq_len]` rows."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids = torch.from_numpy(rows[i : i + batch_size])
            total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
    model.train(was_training)
    return total / len(rows)


def fixed_rows(docs: Sequence[np.ndarray], seq_len: int, max_rows: int) -> np.ndarray:
    """The first `max_rows` packed rows of `docs` in their given order (no shuffling): the
    same held-out rows at every evaluation."""
    stream = np.concatenate(list(docs))
    n = min(max_rows, len(stream) // seq_len)
    if n < 1:
        raise ConfigError(f"held-out documents ({len(stream)} tokens) fill no row of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


def _adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW decaying the matrices only: norms and biases stay unshrunk."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def _optimizer_step(model, opt, batch: np.ndarray, lr: float, desc: str) -> float:
    """One clipped AdamW step at `lr` on `[batch_size, seq_len]` int64 ids; its loss (nats
    per token)."""
    for group in opt.param_groups:
        group["lr"] = lr
    ids = torch.from_numpy(batch)
    loss = model(input_ids=ids, labels=ids).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{desc}: non-finite loss {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


@dataclasses.dataclass
class _Plateau:
    """The held-out curve of a run and whether it stopped improving: `schedule.patience`
    evaluations in a row without a `schedule.tol` relative improvement (counted from the end
    of the warmup, while the stable phase lasts)."""

    schedule: Schedule
    converged: bool | None  # None for a fixed schedule, which never waits for a plateau
    best: float = math.inf
    waited: int = 0
    curve: list = dataclasses.field(default_factory=list)  # [[step, loss]]

    def record(self, step: int, loss: float, stable: bool) -> None:
        """The held-out `loss` after `step` steps; `stable`: the stable phase still lasts."""
        self.curve.append([step, round(loss, 5)])
        if stable and step >= self.schedule.warmup:
            if loss < self.best * (1 - self.schedule.tol):
                self.best, self.waited = loss, 0
            else:
                self.waited += 1
            self.converged = self.waited >= self.schedule.patience


def _training_report(step: int, stable_end: int | None, plateau: _Plateau, losses: list) -> dict:
    """The dict `train_causal_lm` returns, from its last state."""
    curve = plateau.curve
    out = {
        "steps": step,
        "stable_steps": stable_end if stable_end is not None else step,
        "converged": plateau.converged,
        "val_loss": curve,
        "final_val_loss": curve[-1][1] if curve else None,
    }
    if not losses:  # no steps: no loss to report (null, not NaN, in zoo.json)
        return out | {"first_loss": None, "final_loss": None}
    k = max(1, step // 10)
    return out | {
        "first_loss": float(np.mean(losses[:k])),
        "final_loss": float(np.mean(losses[-k:])),
    }


def train_causal_lm(
    model: torch.nn.Module,
    docs: Sequence[np.ndarray],
    *,
    schedule: Schedule,
    batch_size: int,
    seq_len: int,
    lr: float,
    weight_decay: float,
    seed: int,
    desc: str,
    val_docs: Sequence[np.ndarray] | None = None,
) -> dict:
    """Next-token training of an HF causal LM on packed `docs` (1-D token-id arrays).

    With `schedule.stable_steps` None the stable phase ends when the loss on `val_docs`
    (held-out documents of the same kind) plateaus, or at `schedule.max_stable`; with it
    set, after exactly that many steps. Deterministic given `seed` and the initial weights.

    Returns {"steps", "stable_steps", "converged" (the plateau was reached; None for a fixed
    schedule), "first_loss"/"final_loss" (mean training loss over the first and last 10% of
    steps, nats per token; None for 0 steps), "val_loss" ([[step, loss]], held-out curve),
    "final_val_loss"}.
    """
    rng = np.random.default_rng(seed)
    batches = packed_batches(docs, seq_len, batch_size, rng)
    val = fixed_rows(val_docs, seq_len, 4 * batch_size) if val_docs is not None else None
    adaptive = schedule.stable_steps is None
    if adaptive and val is None:
        raise ConfigError(f"{desc}: a schedule that waits for a plateau needs held-out docs")
    opt = _adamw(model, lr, weight_decay)
    stable_end = None if adaptive else schedule.stable_steps
    total = schedule.max_steps if adaptive else stable_end + schedule.decay_steps(stable_end)
    if stable_end == 0:
        total = 0
    plateau, losses = _Plateau(schedule, converged=False if adaptive else None), []
    model.train()
    bar = tqdm.tqdm(total=total, desc=desc, leave=False, mininterval=2.0)
    step = 0
    while step < total:
        step_lr = lr * schedule.factor(step, stable_end)
        losses.append(_optimizer_step(model, opt, next(batches), step_lr, desc))
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if val is not None and (step % schedule.eval_every == 0 or step == total):
            plateau.record(step, held_out_loss(model, val, batch_size), stable_end is None)
        if stable_end is None and (plateau.converged or step >= schedule.max_stable):
            stable_end = step  # the plateau, or the last step that leaves room to decay
            total = step + schedule.decay_steps(step)
            bar.total = total
    bar.close()
    model.eval()
    return _training_report(step, stable_end, plateau, losses)
