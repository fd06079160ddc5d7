"""Two processes on loopback (2 CPU devices each) train like one process.

The test starts this file twice as a worker (``python test_multiprocess.py <id> <port> <out>``):
each joins a 2-process JAX run through ``ustad.sharding.initialize_distributed``, builds the same
("data", "ensemble") = (2, 2) mesh over the 4 global devices, splits the members over
"ensemble" and a global batch of 4 images over "data" (so gradients are all-reduced across the
processes), runs 2 train steps with the teacher inside the step, and saves what it sees. The
test compares that with the same 2 steps run in this process on one device.
"""

import os
import socket
import subprocess
import sys

import numpy as np

P, SIZE, DIM, M, BATCH, STEPS = 17, 16, 8, 2, 2, 2
TIMEOUT_S = 150


def _problem():
    """Teacher, students, optimizer and batches (built here, handed to the workers as files)."""
    import jax
    import jax.numpy as jnp

    from ustad import sharding as shd
    from ustad.uninformed_students.nets import patch_net
    from ustad.uninformed_students.steps import init_students, make_optimizer

    key = jax.random.key(0, impl="rbg")  # fast to compile on CPU
    teacher = patch_net(P, widths=1 / 16, out_dim=DIM)
    teacher_vars = jax.jit(teacher.init)(jax.random.fold_in(key, 1), jnp.zeros((1, P, P, 3)))
    teacher_params = jax.device_get(
        {"variables": teacher_vars, "mean": jnp.full(DIM, 0.1), "std": jnp.full(DIM, 0.5)}
    )
    tx = make_optimizer(1e-3, 1e-2)
    one = _one_device_mesh()
    state = init_students(teacher, tx, jax.random.fold_in(key, 2), M, 3, shd.replicated(one))
    state = jax.device_get(state)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(STEPS, BATCH, SIZE, SIZE, 3)).astype(np.float32)
    return teacher, tx, {"teacher": teacher_params, "state": state, "images": images}


def _save_tree(path, tree) -> None:
    import jax

    np.savez(path, *jax.tree.leaves(tree))


def _load_tree(path, like):
    import jax

    with np.load(path) as data:
        leaves = [data[f"arr_{i}"] for i in range(len(data.files))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _worker(process_id: int, port: int, out: str) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    import ustad  # noqa: F401  (XLA flags before the backend starts)
    from ustad import sharding as shd
    from ustad.uninformed_students.nets import patch_net
    from ustad.uninformed_students.steps import init_students, make_optimizer, make_train_step

    shd.initialize_distributed(
        f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
    )
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    teacher = patch_net(P, widths=1 / 16, out_dim=DIM)
    tx = make_optimizer(1e-3, 1e-2)
    # Only the structure is needed here: trace, do not run, the initialisation.
    like_state = jax.eval_shape(
        lambda: init_students(teacher, tx, jax.random.key(0, impl="rbg"), M, 3)
    )
    like_teacher = {
        "variables": jax.eval_shape(teacher.init, jax.random.key(0), jnp.zeros((1, P, P, 3))),
        "mean": 0,
        "std": 0,
    }
    problem = _load_tree(
        os.path.join(out, "problem.npz"),
        {"teacher": like_teacher, "state": like_state, "images": 0},
    )
    mesh = shd.make_mesh(ensemble_size=2)
    step = make_train_step(teacher, tx, teacher=teacher, mesh=mesh, shard_members=True)
    state = shd.put_members(problem["state"], mesh, shard_members=True)
    teacher_params = shd.put_replicated(problem["teacher"], mesh)
    losses = []
    for batch in problem["images"]:
        state, loss = step(state, shd.shard_batch(batch, mesh), teacher_params)
        losses.append(shd.to_host(loss))
    _save_tree(
        os.path.join(out, f"process{process_id}.npz"),
        {"losses": np.stack(losses), "params": shd.to_host(state["params"])},
    )
    jax.distributed.shutdown()


def _one_device_mesh():
    import jax

    from ustad import sharding as shd

    return shd.make_mesh(1, jax.devices()[:1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    import jax

    from ustad import sharding as shd
    from ustad.uninformed_students.steps import make_train_step

    teacher, tx, problem = _problem()
    _save_tree(tmp_path / "problem.npz", problem)
    # XLA's backend optimisation level 0 compiles the workers' step 4× faster here; what is
    # tested is that two processes compute what one does, not the code generator.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        # The one-process reference runs while the workers start.
        # (Placed on a one-device mesh as test_students.py does, to share its compiled step.)
        one = _one_device_mesh()
        step = make_train_step(teacher, tx, teacher=teacher, mesh=one)
        state, losses = shd.put_members(problem["state"], one, False), []
        teacher_params = shd.put_replicated(problem["teacher"], one)
        for batch in problem["images"]:
            state, loss = step(state, shd.shard_batch(batch, one), teacher_params)
            losses.append(np.asarray(loss))
        expected = {"losses": np.stack(losses), "params": jax.device_get(state["params"])}
        outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    for i in range(2):
        result = _load_tree(tmp_path / f"process{i}.npz", expected)
        np.testing.assert_allclose(result["losses"], expected["losses"], rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
            result["params"],
            expected["params"],
        )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
