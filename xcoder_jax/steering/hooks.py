"""Interventions at the crosscoder's site with the exported dictionary, in PyTorch.

Two interventions on the input of block L (through `site.block_input_hook`, so they act on
exactly the residual stream the crosscoder was trained on):

- steering adds a vector built from the steered model's own decoder rows, `x <- x + v`, at
  every position (`CONVENTIONS`: how alpha scales it);
- ablation removes chosen latents' contribution and keeps everything else, including the
  crosscoder's reconstruction error: `x_m <- x_m - sum_{i in S} f_i(x) W_dec[i, m]`, at the
  positions where the store would hold a row (`xcoder_jax.intervention`: the store's
  `Exclusion`, padding left out), the rule and subtraction the ablation experiment uses too.

The crosscoder's encoder reads BOTH models at once (`f = ReLU(sum_m x_m W_enc[m] + b_enc)`),
so f cannot be computed from the ablated model's residual alone. `ablate` therefore first
runs both models on the same input up to block L, computes f there, and only then installs
the subtraction in the target model; the target model's block-L input is then exactly the
one f was computed from. The hooks are removed on exit, also when the body raises.

`steer` and `ablate` refuse misuse before installing anything: a slot the export does not
have, latent ids it does not have, an empty set to steer along, a model of another d_model or
depth, and, when the export records which models it was trained on (the pipeline's exports
do), a model that is not the one of its slot (`ExportedCrosscoder.check_identity`; opt out
with check_model=False to intervene on another model on purpose).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from xcoder_jax import intervention, site
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.errors import UsageError
from xcoder_jax.exported import ExportedCrosscoder

# --- Context managers -----------------------------------------------------------------------


@contextlib.contextmanager
def add_at_site(model, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Adds `vector` [d] (raw) to the input of block `layer` at every position.

    An all-zero vector installs a hook that leaves the input untouched, so logits are
    bit-identical to the clean model's.
    """
    if bool((vector == 0).all()):
        fn = lambda hidden: None
    else:
        fn = lambda hidden: hidden + vector.to(hidden.device, hidden.dtype)
    with site.block_input_hook(model, layer, fn):
        yield


@contextlib.contextmanager
def steer(
    model,
    xcoder: ExportedCrosscoder,
    latents: Sequence[int],
    alpha: float,
    *,
    model_index: int,
    convention: str = "norm",
    check_model: bool = True,
) -> Iterator[torch.Tensor]:
    """Steers `model` (crosscoder slot `model_index`) along its own decoder rows of `latents`.

    Yields the added vector [d] (raw); see `ExportedCrosscoder.steering_vector` for alpha
    and `convention` ("norm" or "raw"). `latents` must name at least one latent.

    The model must have the export's d_model and block L, and be the model of slot
    `model_index`: when the export records the models it was trained on (exports of this
    library do; see `identity.model_fingerprint` for how a model is recognised), the export's
    other model raises ExportError, and so does a model matching neither (one built in memory,
    not loaded from a model directory or hub id, matches neither). check_model=False skips
    the identity check, to steer another model (e.g. a fine-tune of the pair) with the
    export's directions on purpose; exports without recorded models are never checked.
    """
    model_index = xcoder.check_slot(model_index)
    xcoder.check_model(model)
    if check_model:
        fix = "; pass model_index={slot} if it is the model you mean to steer"
        xcoder.check_identity(model, model_index, fix=fix)
    vector = xcoder.steering_vector(latents, model_index, alpha, convention)
    with add_at_site(model, xcoder.layer, vector):
        yield vector


@contextlib.contextmanager
def subtract_at_site(model, layer: int, delta: torch.Tensor, where: torch.Tensor) -> Iterator[None]:
    """x <- x - delta at the input of block `layer` where `where` [batch, seq] (bool; see
    `intervention.stored_positions`); every other position keeps its clean value.

    delta: [batch, seq, d] raw, for exactly the input the model is then run on.
    """

    def fn(hidden):
        if hidden.shape != delta.shape:
            raise ValueError(
                f"the ablation was prepared for block inputs of shape {tuple(delta.shape)}, "
                f"but the model was run on {tuple(hidden.shape)}"
            )
        return intervention.subtract(hidden, delta, where)

    with site.block_input_hook(model, layer, fn):
        yield


@torch.no_grad()
def site_inputs(models: Sequence, layer: int, input_ids, attention_mask=None) -> torch.Tensor:
    """Both models' block-L inputs on the same tokens: [batch, seq, m, d], raw, float32."""
    return torch.stack(
        [site.forward_to_site(m, layer, input_ids, attention_mask).float() for m in models], 2
    )


@contextlib.contextmanager
def ablate(
    models: Sequence,
    target: int,
    xcoder: ExportedCrosscoder,
    latents: Sequence[int],
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    exclusion: Exclusion | int | None = None,
    x: torch.Tensor | None = None,
    check_model: bool = True,
) -> Iterator[torch.Tensor]:
    """Removes `latents`' contribution from `models[target]`'s block-L input for this input.

    models: the pair in crosscoder order. f is computed from both models' block-L inputs on
    `input_ids` (or from `x` [batch, seq, m, d] raw, when the caller already has them); the
    target model must then be run on the same `input_ids` inside the context. An empty
    latent set is refused (UsageError): the clean reference is the model without the hook.
    Yields the subtracted delta [batch, seq, d].

    The latents are removed where the store would hold a row (`intervention`): positions
    kept by `exclusion` (the store's `Exclusion.from_manifest(store.manifest)`; an int n
    leaves out the first n positions; default position 0, extraction's default) and not
    padding (`attention_mask`). Everywhere else the input keeps its clean value.

    Every `models[i]` must be the export's model of slot i (checked as in `steer`, so a pair
    given in the wrong order raises ExportError); check_model=False skips that identity
    check, and exports without recorded models are never checked.
    """
    target = xcoder.check_slot(target)
    ids = xcoder.check_latents(latents, allow_empty=False)
    if len(models) != xcoder.n_models:
        raise UsageError(
            f"ablate needs the export's {xcoder.n_models} models in slot order "
            f"({xcoder.slots()}), got {len(models)}"
        )
    for m in models:
        xcoder.check_model(m)
    if check_model:
        order = ", ".join(xcoder.role(i) for i in range(xcoder.n_models))
        fix = f"; pass the models in slot order ({order})"
        for i, m in enumerate(models):
            xcoder.check_identity(m, i, who=f"models[{i}]", fix=fix)
    if x is None:
        x = site_inputs(models, xcoder.layer, input_ids, attention_mask)
    delta = xcoder.ablation_delta(x, ids, target)
    if not ids:
        with site.block_input_hook(models[target], xcoder.layer, lambda hidden: None):
            yield delta
        return
    where = intervention.stored_positions(input_ids, exclusion, attention_mask)
    with subtract_at_site(models[target], xcoder.layer, delta, where):
        yield delta
