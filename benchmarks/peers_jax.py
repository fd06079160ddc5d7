"""ustad's side of ``benchmarks/peers.py``: the same measures as ``peers_torch.py``, in JAX.

Run in its own process by ``python -m benchmarks.peers --worker=CASE --worker_options=JSON``;
returns the median seconds of one call after ``warmup`` calls, the calls' seconds, the peak RSS
of the process, the versions, XLA's flags and the member strategy ``"auto"`` picked.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import ustad  # noqa: F401  (sets the fast CPU convolution flag before any backend starts)


def stfpm_setup(options):
    from ustad.stfpm import steps
    from ustad.stfpm.nets import pyramid_net

    network = pyramid_net("resnet18")
    tx = steps.make_optimizer()
    size = options["image_size"]
    key = jax.random.key(0)
    teacher = network.init(jax.random.key(1), jnp.zeros((1, size, size, 3)))
    students = steps.init_students(network, tx, key, options.get("num_students", 1))
    return network, tx, teacher, students


def stfpm_step(options):
    """One call = one jitted step of ustad's STFPM trainer with the teacher inside the step."""
    from ustad.stfpm import steps

    network, tx, teacher, students = stfpm_setup(options)
    size = options["image_size"]
    images = jax.random.uniform(jax.random.key(2), (options["batch"], size, size, 3))
    step = steps.make_train_step(network, tx, cached_targets=False)
    holder = {"students": students}

    def call():
        holder["students"], losses = step(holder["students"], images, teacher)
        return losses

    return call, xla_flops(step, students, images, teacher)


def stfpm_score(options):
    """One call = ``STFPMDetector.score`` of ``images`` images (maps and image scores)."""
    from ustad.stfpm.checkpoints import STFPMModel
    from ustad.stfpm.score import STFPMDetector

    network, _, teacher, students = stfpm_setup(options)
    size = options["image_size"]
    params = {
        "teacher": teacher,
        "students": {"params": students["params"], "batch_stats": students["batch_stats"]},
    }
    model = STFPMModel(network=network, params=jax.tree.map(np.asarray, params),
                       image_size=(size, size))  # fmt: skip
    detector = STFPMDetector([model], batch_size=options["batch"])
    images = np.random.default_rng(0).random((options["images"], size, size, 3), np.float32)
    # The networks' forward passes (teacher + M students) of every image: XLA's count.
    forward = xla_flops(jax.jit(network.apply), teacher, jnp.asarray(images[:1]))
    members = 1 + options.get("num_students", 1)
    flops = None if forward is None else forward * members * options["images"]
    return (lambda: detector.score(images)[1]), flops


def students_step(options):
    """One call = one jitted step: the teacher's normalised descriptors and M Adam steps."""
    from ustad.uninformed_students.flops import dense_conv_flops, train_step_flops
    from ustad.uninformed_students.nets import patch_net
    from ustad.uninformed_students.steps import init_students, make_optimizer, make_train_step

    p, size = options["patch_size"], options["image_size"]
    network = patch_net(p)
    tx = make_optimizer(1e-4, 1e-5)
    key = jax.random.key(0)
    teacher = {
        "variables": network.init(jax.random.key(1), jnp.zeros((1, p, p, 3))),
        "mean": jnp.zeros(network.out_dim),
        "std": jnp.ones(network.out_dim),
    }
    state = init_students(network, tx, key, options["num_students"], 3)
    images = jax.random.uniform(jax.random.key(2), (options["batch"], size, size, 3))
    step = make_train_step(network, tx, teacher=network)
    holder = {"state": state}

    def call():
        holder["state"], losses = step(holder["state"], images, teacher)
        return losses

    # Convolutions counted on paper: M students' forward and backward, and the teacher's forward.
    flops = train_step_flops(network, size, size, options["num_students"], options["batch"])
    flops += options["batch"] * dense_conv_flops(network, size, size)[0]
    return call, flops


def students_score(options):
    """One call = ``Detector.score`` of ``images`` images at one scale."""
    from ustad.ensemble import ScoreNormalization
    from ustad.uninformed_students.checkpoints import ScaleModel
    from ustad.uninformed_students.flops import scoring_flops
    from ustad.uninformed_students.nets import patch_net
    from ustad.uninformed_students.score import Detector
    from ustad.uninformed_students.steps import init_students, make_optimizer

    p, size = options["patch_size"], options["image_size"]
    network = patch_net(p)
    teacher = network.init(jax.random.key(1), jnp.zeros((1, p, p, 3)))
    tx = make_optimizer(1e-4, 1e-5)
    students = init_students(network, tx, jax.random.key(0), options["num_students"], 3)
    params = {
        "teacher": teacher,
        "students": students["params"],
        "mean": np.zeros(network.out_dim, np.float32),
        "std": np.ones(network.out_dim, np.float32),
    }
    scale = ScaleModel(
        network=network,
        params=jax.tree.map(np.asarray, params),
        normalization=ScoreNormalization(0.1, 1.2, 0.2, 1.3),
        image_size=(size, size),
        channels=3,
    )
    detector = Detector([scale], batch_size=options["batch"])
    images = np.random.default_rng(0).random((options["images"], size, size, 3), np.float32)
    flops = scoring_flops(network, size, size, options["num_students"]) * options["images"]
    return (lambda: detector.score(images)[1]), flops


def stfpm_pieces(options):
    """Where STFPM's step goes: the teacher's forward, one student's forward (train mode), its
    forward and backward (no optimizer), the step on cached teacher maps, the full step."""
    from ustad.ensemble import member
    from ustad.stfpm import steps

    network, tx, teacher, students = stfpm_setup(options)
    size = options["image_size"]
    images = jax.random.uniform(jax.random.key(2), (options["batch"], size, size, 3))
    one = member(students, 0)
    teacher_fn = steps.teacher_maps_fn(network)
    targets = teacher_fn(teacher, images)

    def student_forward(m, x):
        variables = {"params": m["params"], "batch_stats": m["batch_stats"]}
        return network.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    def student_grad(m, x, t):
        return jax.value_and_grad(steps.student_loss, argnums=1, has_aux=True)(
            network, m["params"], m["batch_stats"], x, t
        )

    forward, grad = jax.jit(student_forward), jax.jit(student_grad)
    cached = steps.make_train_step(network, tx, cached_targets=True)
    full = steps.make_train_step(network, tx, cached_targets=False)
    holder, cached_call, full_call = step_calls(cached, full, students, images, targets, teacher)

    return {
        "teacher_forward": (
            lambda: teacher_fn(teacher, images), xla_flops(teacher_fn, teacher, images)
        ),
        "student_forward_train": (lambda: forward(one, images), xla_flops(forward, one, images)),
        "student_forward_backward": (
            lambda: grad(one, images, targets), xla_flops(grad, one, images, targets)
        ),
        "step_cached_teacher_maps": (
            cached_call, xla_flops(cached, holder["cached"], images, targets)
        ),
        "step": (full_call, xla_flops(full, holder["full"], images, teacher)),
    }  # fmt: skip


def step_calls(cached, full, state, images, targets, teacher):
    """``(holder, cached_call, full_call)``: the step on cached targets and the full step, each
    called on its own copy of ``state`` (kept in ``holder`` under "cached" and "full", updated
    by every call: the steps donate their state)."""
    holder = {"cached": jax.tree.map(jnp.copy, state), "full": state}

    def cached_call():
        holder["cached"], losses = cached(holder["cached"], images, targets)
        return losses

    def full_call():
        holder["full"], losses = full(holder["full"], images, teacher)
        return losses

    return holder, cached_call, full_call


def students_pieces(options):
    """Where the Uninformed Students' step goes: the teacher's dense pass, one student's
    forward and backward, the M students' step on cached targets, the full step."""
    from ustad.ensemble import member
    from ustad.uninformed_students.flops import dense_conv_flops, train_step_flops
    from ustad.uninformed_students.maps import teacher_targets
    from ustad.uninformed_students.nets import patch_net
    from ustad.uninformed_students.steps import (
        init_students,
        make_optimizer,
        make_train_step,
        student_loss,
    )

    p, size, batch, m = (options[k] for k in ("patch_size", "image_size", "batch", "num_students"))
    network = patch_net(p)
    tx = make_optimizer(1e-4, 1e-5)
    variables = network.init(jax.random.key(1), jnp.zeros((1, p, p, 3)))
    mean, std = jnp.zeros(network.out_dim), jnp.ones(network.out_dim)
    teacher = {"variables": variables, "mean": mean, "std": std}
    state = init_students(network, tx, jax.random.key(0), m, 3)
    images = jax.random.uniform(jax.random.key(2), (batch, size, size, 3))
    teacher_fn = jax.jit(lambda v, x: teacher_targets(network, v, mean, std, x))
    targets = teacher_fn(variables, images)
    one = member(state["params"], 0)
    grad = jax.jit(jax.value_and_grad(lambda q, x, t: student_loss(network, q, x, t)))
    cached = make_train_step(network, tx)
    full = make_train_step(network, tx, teacher=network)
    holder, cached_call, full_call = step_calls(cached, full, state, images, targets, teacher)

    forward, first = dense_conv_flops(network, size, size)
    return {
        "teacher_dense": (lambda: teacher_fn(variables, images), batch * forward),
        "student_forward_backward": (
            lambda: grad(one, images, targets),
            batch * (3 * forward - first),
        ),
        "step_cached_targets": (cached_call, train_step_flops(network, size, size, m, batch)),
        "step": (full_call, train_step_flops(network, size, size, m, batch) + batch * forward),
    }


def write_port_check(options) -> dict:
    """Random weights, images and ustad's dense descriptors of them, saved for the PyTorch port
    to reproduce (``--check_port``): the port is checked to compute what ustad computes."""
    from ustad.uninformed_students.dense import dense_apply
    from ustad.uninformed_students.nets import patch_net

    p, size = options["patch_size"], options["image_size"]
    network = patch_net(p)
    variables = network.init(jax.random.key(p), jnp.zeros((1, p, p, 3)))
    images = jax.random.uniform(jax.random.key(1), (2, size, size, 3))
    arrays = {"images": np.asarray(images), "descriptors": np.asarray(dense_apply(
        network, variables, images))}  # fmt: skip
    for name, layer in variables["params"].items():
        arrays[f"{name}/kernel"] = np.asarray(layer["kernel"])
        arrays[f"{name}/bias"] = np.asarray(layer["bias"])
    np.savez(options["path"], **arrays)
    return {"written": options["path"], "shape": list(arrays["descriptors"].shape)}


def matmul(options):
    """This machine's float32 matmul throughput (the peak the other measures are set against):
    the [4096, 3200] @ [3200, 256] product of benchmarks/teacher_step.py."""
    a = jax.random.normal(jax.random.key(0), (4096, 3200))
    b = jax.random.normal(jax.random.key(1), (3200, 256))
    product = jax.jit(lambda a, b: a @ b)
    return (lambda: product(a, b)), 2.0 * 4096 * 3200 * 256


def xla_flops(jitted, *args) -> float | None:
    """XLA's FLOP count of one compiled call (None where the backend gives none)."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001  (backends without cost analysis)
        return None


CASES = {
    "matmul": (matmul, "patch_net"),
    "stfpm_pieces": (stfpm_pieces, "pyramid"),
    "us_pieces": (students_pieces, "patch_net"),
    "us_step": (students_step, "patch_net"),
    "us_score": (students_score, "patch_net"),
    "stfpm_step": (stfpm_step, "pyramid"),
    "stfpm_score": (stfpm_score, "pyramid"),
}


def run(case: str, options: dict) -> dict:
    from ustad.ensemble import resolve_member_strategy

    build, network_kind = CASES[case]
    built = build(options)
    pieces = built if isinstance(built, dict) else {"call": built}
    timed = {}
    for name, (call, flops) in pieces.items():
        for _ in range(options["warmup"]):
            jax.block_until_ready(call())
        times = []
        for _ in range(options["repeats"]):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
        timed[name] = {"seconds": statistics.median(times), "times": times, "flops": flops}
    import flax

    result = {}
    if not isinstance(built, dict):
        seconds, flops = timed["call"]["seconds"], timed["call"]["flops"]
        result.update(seconds=seconds, times=[round(t, 4) for t in timed["call"]["times"]])
    else:
        seconds, flops = sum(t["seconds"] for t in timed.values()), None
        result["seconds"] = seconds
        result["pieces"] = {
            name: {"seconds": round(t["seconds"], 4), "flops": t["flops"]}
            for name, t in timed.items()
        }
    return {
        **result,
        "flops_per_call": flops,
        "gflops_per_s": None if not flops else round(flops / seconds / 1e9, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
        "threads": {
            "cpu_devices": jax.device_count(),
            "os_cpus": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "strategy": resolve_member_strategy("auto", network=network_kind),
    }
