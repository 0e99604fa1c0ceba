"""Sequence tiling of position-wise modules (the MLP): their wide activations never exist whole.

An MLP acts on each token alone, but at long sequence its activations are the largest tensors of a layer:
``[S_local, intermediate]`` three or four times over (gate, up, their product, the activation's input),
3.5x the hidden size each for Llama. :func:`tiled` runs the module over tiles of tokens, each under its own
non-reentrant checkpoint: the forward keeps only the tile's input (a view of the module's input, which
the layer holds anyway), and the backward recomputes one tile at a time. The GPU then holds one tile's
activations whatever ``S``, for one more forward of the module per step (ALST's TiledMLP does the same).

Because all tiles are nodes of the one autograd graph, each parameter's gradient is accumulated once per
backward, from all tiles, so ZeRO's gradient hooks fire as they do for the untiled module.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.utils.checkpoint


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_tokens: int, dim: int = 1) -> torch.Tensor:
    """``fn(x)`` computed over tiles of ``tile_tokens`` positions along ``dim`` (``fn`` must act on each
    position alone, e.g. an MLP), recomputing each tile in backward.

    ``x``: ``[B, S_local, ...]`` (sequence on ``dim``); returns ``fn(x)``, shaped as ``fn`` makes it.
    Without grad, or when ``x`` is one tile, it is ``fn(x)`` itself.
    """
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be a positive number of tokens, got {tile_tokens}")
    S = x.shape[dim]
    if S <= tile_tokens:
        return fn(x)
    if not torch.is_grad_enabled():
        # no backward to recompute for: tiling still bounds the activations of the forward
        return torch.cat([fn(t) for t in x.split(tile_tokens, dim=dim)], dim=dim)
    return torch.cat([torch.utils.checkpoint.checkpoint(fn, t, use_reentrant=False)
                      for t in x.split(tile_tokens, dim=dim)], dim=dim)


_BASE_FORWARD_ATTR = "_ds_longctx_base_forward"


def base_forward(module: torch.nn.Module) -> Callable:
    """The forward a module's tiles run: the replacement :func:`set_base_forward` gave it, else its class's."""
    replacement = module.__dict__.get(_BASE_FORWARD_ATTR)
    return replacement if replacement is not None else type(module).forward.__get__(module)


def set_base_forward(module: torch.nn.Module, forward: Optional[Callable]) -> None:
    """Replace ``module``'s own computation by ``forward`` (None: back to its class's), under its tiling if it is
    tiled: tiling and a replaced computation (e.g. fused kernels) compose in either order."""
    current = module.__dict__.get("forward")
    if forward is None:
        previous = module.__dict__.pop(_BASE_FORWARD_ATTR, None)
        if previous is not None and current is previous:  # another wrapper (tiles, the user's) stays
            del module.forward
        return
    object.__setattr__(module, _BASE_FORWARD_ATTR, forward)
    if not isinstance(current, TiledForward):
        module.forward = forward


class TiledForward:
    """A module's ``forward`` replaced by :func:`tiled` over its :func:`base_forward` (see :func:`tile_module`)."""

    def __init__(self, module: torch.nn.Module, tile_tokens: int):
        self.module = module
        self.tile_tokens = tile_tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return tiled(base_forward(self.module), x, self.tile_tokens)


def tile_module(module: torch.nn.Module, tile_tokens: int) -> None:
    """Make ``module(x)`` (one tensor input ``[B, S_local, ...]``, position-wise) run tiled. ``module``'s own
    hooks run once around the whole call, its submodules' once per tile (ZeRO-3 gathers their parameters
    then; with its trace recorded it keeps parameters that are used again at once)."""
    module.forward = TiledForward(module, tile_tokens)


def untile_module(module: torch.nn.Module) -> None:
    """Undo :func:`tile_module`."""
    if isinstance(module.__dict__.get("forward"), TiledForward):
        del module.forward
        replacement = module.__dict__.get(_BASE_FORWARD_ATTR)
        if replacement is not None:
            module.forward = replacement


__all__ = ["TiledForward", "base_forward", "set_base_forward", "tile_module", "tiled", "untile_module"]
