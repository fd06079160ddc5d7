"""The analytic FLOP counts the benchmarks report agree with XLA's count of dense extraction."""

import jax
import jax.numpy as jnp
import pytest

from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.flops import dense_conv_flops, scoring_flops, train_step_flops
from ustad.uninformed_students.nets import patch_net


@pytest.mark.parametrize("p, size", [(17, 16), (33, 20)])
def test_dense_conv_flops_match_xla_cost_analysis(p, size):
    network = patch_net(p, widths=0.125, out_dim=8)
    sample = jnp.zeros((1, p, p, 3))
    variables = jax.jit(network.init)(jax.random.key(0, impl="rbg"), sample)
    images = jnp.zeros((1, size, size, 3))
    dense = jax.jit(lambda v, x: dense_apply(network, v, x, method="multipool"))
    cost = dense.lower(variables, images).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if not cost or not cost.get("flops"):
        pytest.skip("this backend has no cost analysis")
    total, first = dense_conv_flops(network, size, size)
    # XLA also counts activations and pooling: a few percent more than the convolutions.
    assert total <= cost["flops"] <= 1.05 * total
    assert 0 < first < total


def test_step_and_scoring_flops_follow_the_forward_count():
    network = patch_net(17, widths=0.125, out_dim=8)
    forward, first = dense_conv_flops(network, 32, 24)
    assert train_step_flops(network, 32, 24, num_students=3, batch=2) == 6 * (3 * forward - first)
    assert scoring_flops(network, 32, 24, num_students=3) == 4 * forward
