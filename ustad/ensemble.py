"""Ensembles of M members as one stacked pytree (leading axis M), built and run by ``jax.vmap``.

A single member is written ensemble-unaware; these helpers lift it. Never a Python loop over
members: one trace, one XLA program, and the member axis can be sharded across devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ustad.stats import Moments, finalize

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


PyTree = Any


class ScoreNormalization(NamedTuple):
    """Mean and standard deviation of e and v over the validation pixels (scalars)."""

    error_mean: float
    error_std: float
    variance_mean: float
    variance_std: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._asdict().items()}


# The students regress targets of unit variance per dimension, so e (and v) of any student that
# learnt something are O(d) per pixel; a mean beyond this many times d means training diverged
# (lr = 10 gave e ≈ 6e21) even when nothing overflowed to inf.
ABSURD_PER_DIMENSION = 1e4


def check_normalization(normalization: ScoreNormalization, out_dim: int, where: str) -> None:
    """Raise ``FloatingPointError`` if the score statistics are not finite or absurdly large.

    Args:
      normalization: e/v statistics of one scale.
      out_dim: d, the descriptor dimension.
      where: what they belong to (a workdir), for the message.
    """
    for name, value in normalization.as_dict().items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{where}: the score normalisation has {name} = {value}, so every score would be "
                f"0 or NaN; training diverged: retrain in a new workdir with a lower "
                f"--config.learning_rate"
            )
    limit = ABSURD_PER_DIMENSION * out_dim
    for name in ("error_mean", "variance_mean"):
        value = getattr(normalization, name)
        if value > limit:
            raise FloatingPointError(
                f"{where}: the score normalisation has {name} = {value:.3g}, beyond {limit:.3g} "
                f"({ABSURD_PER_DIMENSION:g} × d, d = {out_dim}; the targets have unit variance "
                f"per dimension): training diverged; retrain in a new workdir with a lower "
                f"--config.learning_rate"
            )


MEMBER_STRATEGIES = ("auto", "vmap", "sequential")
# What "auto" picks on CPU for M > 1, per kind of network: the faster strategy measured by
# benchmarks/member_strategy.py (RESULTS.md "Member strategy"). Accelerators always vmap.
CPU_STRATEGY = {"patch_net": "sequential", "pyramid": "sequential"}


def resolve_member_strategy(
    strategy: str = "auto", *, sharded: bool = False, network: str = "patch_net"
) -> str:
    """How a function of one student is lifted to the M stacked students (M > 1; a single
    member is always run directly, see :func:`map_members`).

    ``"vmap"`` batches the members into one computation (convolutions whose input and kernel
    both carry the member axis become grouped convolutions). ``"sequential"`` runs the members
    one after another inside the same compiled program (a fully unrolled ``lax.scan``: ordinary
    convolutions, one member's activations at a time).

    ``"auto"`` reads :data:`CPU_STRATEGY` on CPU, by ``network``: for M = 3, members in turn
    ran 1.61× faster than vmap for the small p = 33 patch network at 128², batch 2 (0.57 vs
    0.91 s), 1.48× for the full p = 65 one at 128², and 1.56× for STFPM's ResNet-18 pyramid at
    256², batch 8 (3.17 vs 4.93 s; benchmarks/member_strategy.py, one run on 2 AMD EPYC
    cores). It picks ``"vmap"`` on accelerators (grouped convolutions are native there) and
    whenever the members are sharded over devices, so that each device runs its own members.
    A rolled loop (``lax.map``, or a ``lax.scan`` of one member, which ``unroll=True`` leaves
    rolled) ran 13–30× slower on XLA:CPU and is never used.
    """
    if strategy not in MEMBER_STRATEGIES:
        raise ValueError(f"member_strategy must be one of {MEMBER_STRATEGIES}, got {strategy!r}")
    if network not in CPU_STRATEGY:
        raise ValueError(f"network must be one of {tuple(CPU_STRATEGY)}, got {network!r}")
    if strategy != "auto":
        return strategy
    if jax.default_backend() != "cpu" or sharded:
        return "vmap"
    return CPU_STRATEGY[network]


def map_members(fn, stacked: PyTree, *shared, strategy: str = "vmap"):
    """``fn(member, *shared)`` for every member of ``stacked`` (leading axis M).

    A single member (M = 1) is run directly, whatever the strategy: the program is then the
    single student's own (a one-member ``lax.scan`` made STFPM's ResNet step 26× slower on
    CPU, and a one-member vmap adds a batch axis to every operation).

    Args:
      fn: a function of one member's pytree and the shared arguments.
      stacked: pytree with leading axis M.
      *shared: arguments common to all members (e.g. the images).
      strategy: ``"vmap"`` or ``"sequential"`` (see :func:`resolve_member_strategy`).

    Returns:
      ``fn``'s outputs stacked along a new leading axis M.
    """
    if strategy not in ("vmap", "sequential"):
        raise ValueError(f"strategy must be 'vmap' or 'sequential', got {strategy!r}")
    if num_members(stacked) == 1:
        outputs = fn(jax.tree.map(lambda x: x[0], stacked), *shared)
        return jax.tree.map(lambda x: jnp.expand_dims(x, 0), outputs)
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(stacked, *shared)
    # Fully unrolled: straight-line code, no while loop (XLA:CPU ran convolutions inside a
    # rolled loop ~30× slower).
    _, outputs = jax.lax.scan(
        lambda carry, member: (carry, fn(member, *shared)), None, stacked, unroll=True
    )
    return outputs


def mixture_mean(student_outputs: jax.Array) -> jax.Array:
    """``[M, ..., D] → [..., D]``: the mean of the students' predictions."""
    return jnp.mean(student_outputs, axis=0)


def regression_error(student_outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``e = ||μ̄ − t||²``.

    Args:
      student_outputs: ``[M, ..., D]`` students' predictions μ^{S_i}.
      targets: ``[..., D]`` normalised teacher descriptors.

    Returns:
      ``[...]`` float32.
    """
    diff = mixture_mean(student_outputs.astype(jnp.float32)) - targets.astype(jnp.float32)
    return jnp.sum(jnp.square(diff), axis=-1)


def predictive_variance(student_outputs: jax.Array) -> jax.Array:
    """``v = (1/M) Σ_i ||μ^{S_i}||² − ||μ̄||²``, computed as ``(1/M) Σ_i ||μ^{S_i} − μ̄||²``.

    The two are equal; the centred form avoids the float32 cancellation of the paper's form
    when the predictions are large compared with their spread.

    Args:
      student_outputs: ``[M, ..., D]``.

    Returns:
      ``[...]`` float32, ≥ 0.
    """
    outputs = student_outputs.astype(jnp.float32)
    centred = outputs - jnp.mean(outputs, axis=0)
    return jnp.mean(jnp.sum(jnp.square(centred), axis=-1), axis=0)


def normalized_score(
    error: jax.Array, variance: jax.Array, normalization: ScoreNormalization | jax.Array
) -> jax.Array:
    """``(e − e_μ)/e_σ + (v − v_μ)/v_σ`` elementwise.

    Args:
      error, variance: ``[...]``.
      normalization: a :class:`ScoreNormalization` or ``[4]`` array in its field order.
    """
    e_mean, e_std, v_mean, v_std = (normalization[i] for i in range(4))
    return (error - e_mean) / e_std + (variance - v_mean) / v_std


def normalization_from_moments(moments: Moments) -> ScoreNormalization:
    """From the moments of the ``[..., 2]`` stack ``(e, v)``."""
    stats = finalize(moments, min_std=1e-12)
    return ScoreNormalization(
        float(stats.mean[0]), float(stats.std[0]), float(stats.mean[1]), float(stats.std[1])
    )
