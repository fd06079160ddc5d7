"""Sharded over the 4 fake CPU devices == one device, for the train step, stats and scoring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from ustad import sharding as shd
from ustad.ensemble import ScoreNormalization
from ustad.stats import descriptor_stats
from ustad.uninformed_students.checkpoints import ScaleModel
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector
from ustad.uninformed_students.steps import init_students, make_optimizer, make_train_step
from ustad.uninformed_students.targets import build_target_cache

KEY = functools.partial(jax.random.key, impl="rbg")  # fast to compile on CPU
P, SIZE, DIM, M, BATCH = 17, 16, 8, 2, 2


@pytest.fixture(scope="module")
def setup():
    teacher = patch_net(P, widths=1 / 16, out_dim=DIM)
    teacher_vars = jax.jit(teacher.init)(KEY(1), jnp.zeros((1, P, P, 3)))
    teacher_params = {"variables": teacher_vars, "mean": jnp.full(DIM, 0.1), "std": jnp.ones(DIM)}
    images = np.random.default_rng(0).uniform(size=(2, BATCH, SIZE, SIZE, 3)).astype(np.float32)
    images = images[:, :BATCH]
    tx = make_optimizer(1e-3, 1e-2)
    # Settings, placements and shapes as in test_students.py, whose compiled init and step
    # the one-device reference then reuses.
    one = _one_device_mesh()
    state = jax.device_get(init_students(teacher, tx, KEY(2), M, 3, shd.replicated(one)))
    return teacher, teacher_params, images, tx, state


def _one_device_mesh():
    return shd.make_mesh(1, jax.devices()[:1])


def test_mesh_axes_and_errors():
    mesh = shd.make_mesh(2)
    assert dict(mesh.shape) == {"data": 2, "ensemble": 2}
    assert shd.data_size(shd.make_mesh()) == 4
    with pytest.raises(ValueError, match="divide"):
        shd.make_mesh(3)
    with pytest.raises(ValueError, match="3 students"):
        shd.check_members(mesh, 3, shard_members=True)


def _run(step, state, images, third):
    losses = []
    for batch in images:
        state, loss = step(state, batch, third(batch))
        losses.append(loss)
    return state, np.stack([np.asarray(x) for x in losses])


@pytest.fixture(scope="module")
def reference(setup):
    """Two steps on one device with cached float32 targets."""
    teacher, teacher_params, images, tx, state = setup
    one = _one_device_mesh()
    put = functools.partial(shd.shard_batch, mesh=one)
    params = shd.put_replicated(teacher_params, one)
    targets = lambda x: put(  # noqa: E731
        build_target_cache(
            teacher, params, np.asarray(x), dtype=np.float32, batch_size=BATCH, put=put
        )
    )
    step = make_train_step(teacher, tx, mesh=one)
    return _run(step, shd.put_members(state, one, False), [put(x) for x in images], targets)


@pytest.mark.parametrize("ensemble_size, teacher_in_step", [(1, False), (2, True)])
def test_sharded_train_step_equals_single_device(setup, reference, ensemble_size, teacher_in_step):
    teacher, teacher_params, images, tx, state = setup
    # (data, ensemble) = (2, 1) on two devices, or (2, 2) on all four.
    mesh = shd.make_mesh(ensemble_size, jax.devices()[: 2 * ensemble_size])
    shard_members = ensemble_size > 1
    step = make_train_step(
        teacher,
        tx,
        teacher=teacher if teacher_in_step else None,
        mesh=mesh,
        shard_members=shard_members,
    )
    if teacher_in_step:
        replicated = shd.put_replicated(teacher_params, mesh)
        third = lambda x: replicated  # noqa: E731
    else:
        cache = functools.partial(
            build_target_cache, teacher, teacher_params, dtype=np.float32, batch_size=BATCH
        )
        third = lambda x: shd.shard_batch(cache(np.asarray(x)), mesh)  # noqa: E731
    sharded_images = [shd.shard_batch(x, mesh) for x in images]
    state = shd.put_members(state, mesh, shard_members)
    final, losses = _run(step, state, sharded_images, third)
    expected_spec = PartitionSpec("ensemble") if shard_members else PartitionSpec()
    assert jax.tree.leaves(final)[0].sharding.spec == expected_spec
    assert sharded_images[0].sharding.spec == PartitionSpec("data")
    ref_state, ref_losses = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        shd.to_host(final),
        jax.device_get(ref_state),
    )


def test_sharded_stats_and_scoring_equal_single_device(setup):
    teacher, teacher_params, images, _, state = setup
    mesh = shd.make_mesh()
    flat = np.concatenate([images.reshape(-1, SIZE, SIZE, 3)] * 2)  # 8 images
    describe = lambda v, x: dense_apply(teacher, v, x)  # noqa: E731
    single = descriptor_stats(describe, teacher_params["variables"], flat, batch_size=4)
    sharded = descriptor_stats(
        describe,
        shd.put_replicated(teacher_params["variables"], mesh),
        flat,
        batch_size=4,
        put=lambda x: shd.shard_batch(x, mesh),
    )
    np.testing.assert_allclose(sharded.mean, single.mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sharded.std, single.std, rtol=1e-5)

    params = {
        "teacher": teacher_params["variables"],
        "students": state["params"],
        "mean": teacher_params["mean"],
        "std": teacher_params["std"],
    }
    scale = ScaleModel(teacher, params, ScoreNormalization(1.0, 2.0, 0.5, 0.5), (SIZE, SIZE), 3)
    maps, scores = Detector([scale], batch_size=4).score(flat[:6])
    sharded_maps, sharded_scores = Detector([scale], batch_size=4, mesh=mesh).score(flat[:6])
    np.testing.assert_allclose(sharded_maps, maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded_scores, scores, rtol=1e-5, atol=1e-5)


def test_a_batch_that_does_not_split_is_replicated():
    mesh = shd.make_mesh()
    x = np.arange(6.0).reshape(3, 2)
    placed = shd.shard_batch(x, mesh)
    assert placed.sharding.is_fully_replicated
    np.testing.assert_array_equal(shd.to_host(placed), x)
    assert shd.shard_batch(np.zeros((8, 2)), mesh).sharding.spec == PartitionSpec("data")
