"""How the M students run inside one training step, per family × member strategy × M.

One JSON line per (family, M, strategy): the median time of the jitted step that updates all M
students (``vmap``: one batched computation; ``sequential``: one member after another inside
the same program; with M = 1 both run the single member directly), and, measured in the same
run, the time of one student's step jitted alone, with the ratio. ``"auto"`` is what
:func:`ustad.ensemble.resolve_member_strategy` picks for that family on this device, so a
regression of the table it reads shows here.

    python -m benchmarks.member_strategy                      # both families, M = 1 and 3
    python -m benchmarks.member_strategy --families=stfpm --num_students=1,3 --stfpm_size=256

Defaults: STFPM on ResNet-18 layer1–3 (random weights; speed only) at 256², batch 8, cached
teacher maps; Uninformed Students on the small p = 33 network (⅛ widths, d = 32) at 128², batch
2, cached targets: the CPU presets' shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import device_name, emit, time_fn
from ustad.ensemble import member, resolve_member_strategy

FLAGS = flags.FLAGS
flags.DEFINE_list("families", ["stfpm", "uninformed_students"], "families to time")
flags.DEFINE_list("num_students", ["1", "3"], "M values")
flags.DEFINE_list("strategies", ["vmap", "sequential"], "member strategies")
flags.DEFINE_integer("stfpm_size", 256, "STFPM image size (square)")
flags.DEFINE_integer("stfpm_batch", 8, "STFPM images per step")
flags.DEFINE_integer("students_size", 128, "Uninformed Students image size (square)")
flags.DEFINE_integer("students_batch", 2, "Uninformed Students images per step")
flags.DEFINE_integer("patch_size", 33, "Uninformed Students p")
flags.DEFINE_float("widths", 0.125, "Uninformed Students widths as a fraction of the paper's")
flags.DEFINE_integer("out_dim", 32, "Uninformed Students descriptor dimension d")
flags.DEFINE_integer("repeats", 3, "timed calls (median reported)")
flags.DEFINE_bool(
    "one_member_scan",
    True,
    "with M = 1, also time the one-member lax.scan that ustad ran before 0.1.0's fix (the 26× "
    "defect), as a separate line with member_strategy='one_member_scan'",
)


def stfpm_case(num_students: int, strategy: str):
    """``(step, students, args, single_step, single_args)`` of STFPM's step at the flags' size."""
    from ustad.stfpm import steps
    from ustad.stfpm.nets import pyramid_net

    network = pyramid_net("resnet18")
    tx = steps.make_optimizer()
    key = jax.random.key(0)
    images = jax.random.uniform(key, (FLAGS.stfpm_batch, FLAGS.stfpm_size, FLAGS.stfpm_size, 3))
    teacher = network.init(jax.random.key(1), images[:1])
    targets = jax.jit(lambda x: steps.teacher_maps(network, teacher, x))(images)
    students = steps.init_students(network, tx, key, num_students)
    if strategy == "one_member_scan":
        step = _scanned(lambda m, x, t: steps.student_step(network, tx, m, x, t))
    else:
        step = steps.make_train_step(network, tx, member_strategy=strategy)
    single = jax.jit(lambda m, x, t: steps.student_step(network, tx, m, x, t))
    return step, students, (images, targets), single, (member(students, 0), images, targets)


def students_case(num_students: int, strategy: str):
    """The same for the Uninformed Students' step (cached normalised targets)."""
    from ustad.uninformed_students import steps
    from ustad.uninformed_students.dense import dense_apply
    from ustad.uninformed_students.nets import patch_net

    network = patch_net(FLAGS.patch_size, out_dim=FLAGS.out_dim, widths=FLAGS.widths)
    tx = steps.make_optimizer(1e-3, 1e-5)
    key = jax.random.key(0)
    size = FLAGS.students_size
    images = jax.random.uniform(key, (FLAGS.students_batch, size, size, 3))
    teacher = network.init(jax.random.key(1), jnp.zeros((1, FLAGS.patch_size, FLAGS.patch_size, 3)))
    targets = dense_apply(network, teacher, images)
    students = steps.init_students(network, tx, key, num_students, 3)
    if strategy == "one_member_scan":

        def one_student(state, x, t):
            params, opt_state, loss = steps.student_step(
                network, tx, state["params"], state["opt_state"], x, t
            )
            return {"params": params, "opt_state": opt_state}, loss

        step = _scanned(one_student)
    else:
        step = steps.make_train_step(network, tx, member_strategy=strategy)
    one = member(students, 0)

    def single(params, opt_state, x, t):
        return steps.student_step(network, tx, params, opt_state, x, t, padding="reflect")

    single_args = (one["params"], one["opt_state"], images, targets)
    return step, students, (images, targets), jax.jit(single), single_args


def _scanned(one_student):
    """The step as ustad built it with ``"sequential"`` before a single member was run directly:
    a fully unrolled ``lax.scan`` over the member axis, whatever M."""

    def step(students, images, targets):
        def body(carry, one):
            return carry, one_student(one, images, targets)

        return jax.lax.scan(body, None, students, unroll=True)[1]

    return jax.jit(step, donate_argnums=0)


CASES = {"stfpm": (stfpm_case, "pyramid"), "uninformed_students": (students_case, "patch_net")}


def main(argv):
    del argv
    for family in FLAGS.families:
        case, network_kind = CASES[family]
        auto = resolve_member_strategy("auto", network=network_kind)
        for num_students in (int(m) for m in FLAGS.num_students):
            single_s = None
            strategies = list(FLAGS.strategies)
            if num_students == 1 and FLAGS.one_member_scan:
                strategies.append("one_member_scan")
            for strategy in strategies:
                step, students, args, single, single_args = case(num_students, strategy)
                copies = [jax.tree.map(jnp.copy, students) for _ in range(FLAGS.repeats + 1)]
                calls = iter(copies)  # the step donates its students: a fresh copy per call

                def run(step=step, args=args, calls=calls):
                    return step(next(calls), *args)

                step_s = time_fn(run, warmup=1, repeats=FLAGS.repeats)
                if single_s is None:
                    single_s = time_fn(single, *single_args, warmup=1, repeats=FLAGS.repeats)
                emit(
                    {
                        "benchmark": "member_strategy",
                        "device": device_name(),
                        "family": family,
                        "num_students": num_students,
                        "member_strategy": strategy,
                        "auto_picks": auto,
                        "sizes": _sizes(family),
                        "step_s": round(step_s, 4),
                        "single_student_step_s": round(single_s, 4),
                        "step_over_m_single_steps": round(step_s / (num_students * single_s), 3),
                        "load_avg_1m": _load(),
                    }
                )


def _sizes(family: str) -> dict:
    if family == "stfpm":
        return {
            "network": "resnet18 layer1-3",
            "image": FLAGS.stfpm_size,
            "batch": FLAGS.stfpm_batch,
        }
    return {
        "p": FLAGS.patch_size,
        "widths": FLAGS.widths,
        "d": FLAGS.out_dim,
        "image": FLAGS.students_size,
        "batch": FLAGS.students_batch,
    }


def _load() -> float:
    import os

    return round(os.getloadavg()[0], 2)


if __name__ == "__main__":
    app.run(main)
