"""Ensembles of M members as one stacked pytree (leading axis M), built and run by ``jax.vmap``.

A single member is written ensemble-unaware; these helpers lift it. Never a Python loop over
members: one trace, one XLA program, and the member axis can be sharded across devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

PyTree = Any


def init_ensemble(
    module: nn.Module, key: jax.Array, num_members: int, *sample_args, **sample_kwargs
) -> PyTree:
    """Initialise ``num_members`` independent members.

    Args:
      module: the member's Flax module.
      key: a typed PRNG key; member i is initialised with ``jax.random.split(key, M)[i]``.
      num_members: M.
      *sample_args, **sample_kwargs: example inputs for ``module.init`` (shared by all members).

    Returns:
      The members' variables stacked along a new leading axis of size M.
    """
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    keys = jax.random.split(key, num_members)
    return jax.vmap(lambda k: module.init(k, *sample_args, **sample_kwargs))(keys)


def apply_ensemble(
    module: nn.Module, stacked_variables: PyTree, *args, **kwargs
) -> jax.Array | PyTree:
    """Apply every member to the same inputs.

    Args:
      module: the member's Flax module.
      stacked_variables: variables with leading axis M (from :func:`init_ensemble`).
      *args, **kwargs: inputs shared by all members (static keyword arguments such as ``mode``
        are passed through unchanged).

    Returns:
      The members' outputs stacked along a new leading axis M.
    """
    return jax.vmap(lambda v: module.apply(v, *args, **kwargs))(stacked_variables)


def vmap_members(fn: Callable, *, shared_argnums: tuple[int, ...] = ()) -> Callable:
    """Lift a per-member function to the ensemble.

    Args:
      fn: a function of one member's pytrees (parameters, optimizer state, …).
      shared_argnums: positions of arguments shared by all members (not mapped), e.g. the batch.

    Returns:
      ``fn`` vmapped over the leading axis of every other argument and of the outputs.
    """

    def lifted(*args):
        in_axes = tuple(None if i in shared_argnums else 0 for i in range(len(args)))
        return jax.vmap(fn, in_axes=in_axes)(*args)

    return lifted


def num_members(stacked: PyTree) -> int:
    """M, the size of the leading axis of a stacked pytree."""
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("empty ensemble pytree")
    return int(leaves[0].shape[0])


def member(stacked: PyTree, index: int) -> PyTree:
    """Member ``index`` of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], stacked)
