"""How D (the Dense d→F read-out of T̂) starts a teacher run: at the mean target
(``init_decoder="mean"``), or as the least-squares read-out of the initial T̂ (``"lstsq"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ustad.uninformed_students.teacher import patches as patches_lib
from ustad.uninformed_students.teacher.steps import backbone_inputs, mean_features, teacher_window

__all__ = [
    "decoder_at_mean",
    "decoder_initialiser",
    "decoder_least_squares",
    "least_squares_decoder",
]


def decoder_initialiser(config):
    """The function that initialises D for ``config.init_decoder`` (None: Flax's random init)."""
    return {"mean": decoder_at_mean, "lstsq": decoder_least_squares}.get(
        config.get("init_decoder", "mean")
    )


def _window_targets(config, teacher, target_fn, variables, crops, input_size) -> np.ndarray:
    """``[N, F]`` targets of the crops' anchors, as the train step computes them."""
    windows = teacher_window(patches_lib.center_crop(crops, config.patch_size), teacher)
    features = jax.jit(lambda v, x: target_fn(v, backbone_inputs(x, config.channels, input_size)))
    return np.concatenate(
        [np.asarray(features(variables, windows[i : i + 64])) for i in range(0, len(windows), 64)]
    )


def decoder_at_mean(config, state, teacher, target_fn, variables, crops, input_size):
    """D as the constant predictor of the mean target: zero kernel, bias = the mean over
    ``crops`` (an initialisation the paper leaves open). At lr 2e-4 Adam moves a bias by ~2e-4
    per step, so learning a mean of order 0.1–1 per dimension from zero takes thousands of
    steps, and a random kernel adds noise of order ||T̂(p)||² to L_k. A zero kernel also starts
    the distillation gradient reaching T̂ at zero (it flows through D's kernel), which left the
    shipped teachers trained by the compactness loss alone (issue 23): prefer ``lstsq``."""
    bias = mean_features(
        target_fn,
        variables,
        teacher_window(patches_lib.center_crop(crops, config.patch_size), teacher),
        channels=config.channels,
        backbone_input_size=input_size,
    )
    kernel = jnp.zeros_like(state["params"]["decoder"]["params"]["kernel"])
    decoder_params = {"params": {"kernel": kernel, "bias": bias}}
    return dict(state, params=dict(state["params"], decoder=decoder_params))


# Ridge of the least-squares D, relative to the mean eigenvalue of the descriptors' Gram matrix.
_LSTSQ_RIDGE = 1e-3


def decoder_least_squares(config, state, teacher, target_fn, variables, crops, input_size):
    """D as the least-squares (ridge) linear read-out of the targets from the initial T̂'s
    descriptors on the first ``crops``: L_k starts at what a linear map of T̂ cannot explain,
    and the distillation gradient reaches T̂ from the first step (unlike a zero kernel)."""
    anchors = patches_lib.center_crop(jnp.asarray(crops), config.patch_size)
    if config.channels == 1:
        anchors = patches_lib.to_gray(anchors)
    descriptors = np.asarray(
        jax.jit(teacher.apply)(state["params"]["teacher"], anchors), np.float64
    )
    targets = _window_targets(config, teacher, target_fn, variables, crops, input_size)
    kernel, bias = least_squares_decoder(descriptors, np.asarray(targets, np.float64))
    params = state["params"]["decoder"]["params"]
    decoder_params = {
        "params": {
            "kernel": jnp.asarray(kernel, params["kernel"].dtype),
            "bias": jnp.asarray(bias, params["bias"].dtype),
        }
    }
    return dict(state, params=dict(state["params"], decoder=decoder_params))


def least_squares_decoder(
    descriptors: np.ndarray, targets: np.ndarray, ridge: float = _LSTSQ_RIDGE
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares ``targets ≈ descriptors @ kernel + bias``.

    Args:
      descriptors: ``[N, d]``.
      targets: ``[N, F]``.
      ridge: added to the centred Gram matrix, times its mean diagonal entry.

    Returns:
      ``kernel [d, F]``, ``bias [F]`` (float64).
    """
    x_mean, y_mean = descriptors.mean(0), targets.mean(0)
    centred = descriptors - x_mean
    gram = centred.T @ centred
    gram += ridge * max(np.trace(gram) / len(gram), 1e-12) * np.eye(len(gram))
    kernel = np.linalg.solve(gram, centred.T @ (targets - y_mean))
    return kernel, y_mean - x_mean @ kernel
