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


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Qwen2/Llama-family causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
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
        raise ValueError(
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
