"""Convolution FLOPs of dense extraction, a students' train step and scoring, counted on paper.

The benchmarks report achieved FLOP/s from these counts (XLA's own cost analysis is missing on
some backends and counts the pooling stack differently). Only convolutions are counted, 2 FLOPs
per multiply-accumulate; activations, pooling, the loss and the optimizer are left out (a few
percent at most for the paper's networks).
"""

from __future__ import annotations

from ustad.uninformed_students.nets import Conv, PatchNet

__all__ = ["dense_conv_flops", "scoring_flops", "train_step_flops"]


def dense_conv_flops(
    network: PatchNet, height: int, width: int, channels: int = 3
) -> tuple[float, float]:
    """Forward FLOPs of multi-pooling dense extraction of one image, and those of the first conv.

    Follows :func:`ustad.uninformed_students.dense.dense_apply` exactly: the image padded by
    (p − 1)/2, every s×s pooling multiplying the stacked batch by s² and taking
    ``(S − s + 1) // s`` outputs.

    Args:
      network: the patch network (its last conv has ``out_dim`` features).
      height, width: the image side H, W.
      channels: input channels C.

    Returns:
      ``(total, first)``: FLOPs of every conv, and of the first conv alone.
    """
    rows, cols = height + network.patch_size - 1, width + network.patch_size - 1
    stacked, inputs, total, first = 1, channels, 0.0, None
    convs = [layer for layer in network.layers if isinstance(layer, Conv)]
    for layer in network.layers:
        if isinstance(layer, Conv):
            features = network.out_dim if layer is convs[-1] else layer.features
            rows, cols = rows - layer.kernel + 1, cols - layer.kernel + 1
            flops = 2.0 * layer.kernel**2 * inputs * features * rows * cols * stacked
            first = flops if first is None else first
            total += flops
            inputs = features
        else:
            rows = (rows - layer.size + 1) // layer.size
            cols = (cols - layer.size + 1) // layer.size
            stacked *= layer.size**2
    return total, first


def train_step_flops(
    network: PatchNet, height: int, width: int, num_students: int, batch: int = 1
) -> float:
    """Conv FLOPs of one train step of M students on cached targets.

    Forward, then data and weight gradients (each as costly as the forward) for every conv but
    the first, which needs no data gradient: ``M · B · (3 · forward − first)``.

    Args:
      network: the students' network.
      height, width: the image side.
      num_students: M.
      batch: images per step B.
    """
    forward, first = dense_conv_flops(network, height, width)
    return num_students * batch * (3 * forward - first)


def scoring_flops(network: PatchNet, height: int, width: int, num_students: int) -> float:
    """Conv FLOPs of scoring one image at one scale: the teacher and the M students, dense."""
    return (1 + num_students) * dense_conv_flops(network, height, width)[0]
