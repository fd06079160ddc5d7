"""Torch state dicts -> Flax variables: what the backbone converters share.

Layout transforms (:func:`conv_kernel`, :func:`dense_kernel`, :func:`identity`),
:func:`rules_from_template` (torch key per Flax variable) and :func:`assign_state_dict` (the
name-and-shape check that lists every missing, unexpected and mis-shaped key).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "StateDictMismatchError",
    "assign_state_dict",
    "conv_kernel",
    "dense_kernel",
    "identity",
    "rules_from_template",
]


class StateDictMismatchError(ValueError):
    """A state dict does not fit a model; lists missing, unexpected and mis-shaped keys.

    Attributes:
        missing: keys the model needs that the state dict lacks.
        unexpected: keys of the state dict the model does not use.
        mismatched: ``{key: (shape found, shape expected)}``, both in the file's layout.
    """

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
        source: str = "state dict",
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = dict(sorted(mismatched.items()))
        lines = [f"{source} does not fit the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(
                f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}"
            )
        for key, (found, expected) in self.mismatched.items():
            lines.append(f"  mis-shaped {key}: file has {found}, model expects {expected}")
        super().__init__("\n".join(lines))


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch conv weight [O, I/groups, kh, kw] -> Flax kernel [kh, kw, I/groups, O]."""
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """torch linear weight [out, in] -> Flax kernel [in, out]."""
    return np.transpose(weight)


def identity(array: np.ndarray) -> np.ndarray:
    """Arrays whose layout is the same in torch and Flax (biases, BatchNorm statistics)."""
    return array


_INVERSE_SHAPE: dict[Callable, Callable[[tuple], tuple]] = {
    conv_kernel: lambda s: (s[3], s[2], s[0], s[1]) if len(s) == 4 else s,
    dense_kernel: lambda s: tuple(reversed(s)),
    identity: lambda s: tuple(s),
}


def assign_state_dict(
    state_dict: Mapping[str, np.ndarray],
    rules: Mapping[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]],
    template: Any,
    *,
    optional: Callable[[str], bool] = lambda key: False,
    dtype: Any = np.float32,
    source: str = "state dict",
) -> dict:
    """Builds Flax variables from a torch state dict, checking names and shapes first.

    Args:
        state_dict: ``{torch key: array}``.
        rules: ``{torch key: (Flax variable path, layout transform)}``, the path starting with
            the collection (``("params", "conv1", "kernel")``); the transform is one of
            :func:`conv_kernel`, :func:`dense_kernel`, :func:`identity`.
        template: the model's variables (or their ``jax.eval_shape``), to check shapes against.
        optional: keys that may be present in the file without a rule (e.g. BatchNorm's
            ``num_batches_tracked``) and are ignored.
        dtype: dtype of the returned arrays.
        source: names the state dict (usually its path) in error messages.

    Returns:
        Nested ``{collection: {module: {name: np.ndarray}}}`` variables.

    Raises:
        StateDictMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    missing = [key for key in rules if key not in state_dict]
    unexpected = [key for key in state_dict if key not in rules and not optional(key)]
    mismatched = {}
    variables: dict = {}
    for key, (path, transform) in rules.items():
        if key not in state_dict:
            continue
        expected = template
        for part in path:
            expected = expected[part]
        value = np.asarray(state_dict[key])
        if transform(value).shape != tuple(expected.shape):
            mismatched[key] = (value.shape, _INVERSE_SHAPE[transform](tuple(expected.shape)))
            continue
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.asarray(transform(value), dtype=dtype)
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, source)
    return variables


_LEAF_NAMES = {"bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def rules_from_template(
    template: Mapping[str, Any], torch_module: Callable[[tuple[str, ...]], str]
) -> dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]:
    """Derives :func:`assign_state_dict` rules from a model's own variable tree.

    Flax leaf names map to torch's (``kernel`` -> ``weight`` as conv [4-D] or linear [2-D],
    ``scale`` -> ``weight``, ``mean``/``var`` -> ``running_mean``/``running_var``); module paths
    map through ``torch_module``.

    Args:
        template: ``{collection: nested {module: {leaf: array-like}}}``.
        torch_module: Flax module path (without collection and leaf) -> torch module prefix,
            e.g. ``("layer1_0", "downsample_conv")`` -> ``"layer1.0.downsample.0"``.

    Returns:
        ``{torch key: (Flax variable path, layout transform)}`` covering every template leaf.
    """
    rules = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for name, child in node.items():
                visit(child, (*path, name))
            return
        leaf = path[-1]
        if leaf == "kernel":
            name, transform = "weight", conv_kernel if len(node.shape) == 4 else dense_kernel
        else:
            name, transform = _LEAF_NAMES[leaf], identity
        rules[f"{torch_module(path[1:-1])}.{name}"] = (path, transform)

    visit(template, ())
    return rules
