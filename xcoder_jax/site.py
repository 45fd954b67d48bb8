"""The crosscoder's site: the residual stream entering decoder block L ("resid_pre").

This is the one place that knows where that is in a Hugging Face causal LM of the
Qwen2/Llama family (`model.model.layers[L]`), which layer is the default, and how to read
the block's input with a forward pre-hook. Extraction, splicing, steering and ablation all
go through here, so they agree on the site by construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from xcoder_jax.errors import ConfigError


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Qwen2/Llama-family causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError(
            f"{type(model).__name__} has no `model.layers`; only Qwen2/Llama-family causal LMs "
            "are supported"
        )
    return layers


def num_layers(model) -> int:
    return len(decoder_layers(model))


def resolve_layer(layer: int | None, n_layers: int) -> int:
    """The block index L: `n_layers // 2` when `layer` is None or negative, else checked."""
    if layer is None or layer < 0:
        return n_layers // 2
    if layer >= n_layers:
        raise ConfigError(
            f"layer {layer} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})"
        )
    return layer


@contextlib.contextmanager
def block_input_hook(
    model, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> Iterator[None]:
    """Calls `fn(hidden)` on the input of block `layer`; a returned tensor replaces it.

    `hidden` is `[batch, seq, d_model]` in raw model units. The hook is removed on exit,
    also when the body raises.
    """
    block = decoder_layers(model)[layer]

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = fn(hidden)
        if out is None:
            return None
        if args:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": out}

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised by a capture hook to skip the blocks after L (they are not needed)."""


@contextlib.contextmanager
def capture_block_input(model, layer: int, stop: bool = True) -> Iterator[dict]:
    """Captures the input of block `layer` into `box["hidden"]` (`[batch, seq, d]`, raw).

    With `stop=True` the forward pass ends at block L by raising `StopForward`, which the
    caller catches (see `forward_to_site`); the later blocks would only waste time.
    """
    box: dict = {}

    def fn(hidden):
        box["hidden"] = hidden.detach()
        if stop:
            raise StopForward
        return None

    with block_input_hook(model, layer, fn):
        yield box


@torch.no_grad()
def forward_to_site(model, layer: int, input_ids, attention_mask=None) -> torch.Tensor:
    """The input of block `layer` for a batch: `[batch, seq, d_model]`, raw units."""
    with capture_block_input(model, layer, stop=True) as box:
        try:
            model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return box["hidden"]


class SiteReplay:
    """Blocks L.. of a model rerun from a changed block-L input, for one batch of tokens.

    `record` runs the model once on the batch and keeps block L's input and the arguments
    every later block was called with (masks, rotary position embeddings); `logits(hidden,
    rows, positions)` reruns only blocks L.., the final norm and the unembedding at the
    requested positions. Ablation experiments that try many interventions on the same batch
    skip the blocks before L and the unembedding of unread positions this way; the result
    is the model's own forward pass with block L's input replaced (tested against the hook).
    """

    def __init__(self, model, layer: int, hidden: torch.Tensor, calls: list):
        self.model, self.layer, self.hidden, self.calls = model, layer, hidden, calls

    @classmethod
    @torch.no_grad()
    def record(cls, model, layer: int, input_ids, attention_mask=None) -> SiteReplay:
        blocks = decoder_layers(model)[layer:]
        calls: list = []
        hooks = [
            b.register_forward_pre_hook(
                lambda mod, args, kwargs: calls.append((args[1:], dict(kwargs))), with_kwargs=True
            )
            for b in blocks
        ]
        try:
            with capture_block_input(model, layer, stop=False) as box:
                model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return cls(model, layer, box["hidden"], calls)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, rows, positions) -> torch.Tensor:
        """[n, vocab] logits at (rows[i], positions[i]) with block L's input set to `hidden`
        ([batch, seq, d], raw, the recorded batch's shape)."""
        return self.forward(hidden, rows, positions)

    def forward(self, hidden: torch.Tensor, rows, positions) -> torch.Tensor:
        """`logits` with autograd left as the caller set it (gradients w.r.t. `hidden`)."""
        h = hidden.to(self.hidden.dtype)
        for block, (args, kwargs) in zip(decoder_layers(self.model)[self.layer :], self.calls):
            out = block(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        h = self.model.model.norm(h[rows, positions])
        return self.model.lm_head(h)
