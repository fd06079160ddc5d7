"""How well a trained teacher distils P, on patches it was not trained on.

One JSON line per teacher workdir: on fresh random crops (a PRNG stream the trainer never uses) of
the bundled natural photos, the distillation loss ``||D(T̂(p)) - P(p)||²`` with the run's own
decoder D, the variance of P's features (the loss of always predicting their mean), their ratio
``unexplained`` (0: T̂ carries all of P's information that D can read; 1: none), and the mean
absolute off-diagonal correlation of T̂'s descriptor dimensions (what the compactness loss
drives down). The same numbers for the untrained initialisation of the run (T̂ random, D the
constant mean predictor) put them in context.

    python -m benchmarks.teacher_quality --workdirs runs/teacher_p33
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import ustad  # noqa: F401  (sets the fast CPU flag before JAX starts)
from benchmarks.common import device_name, emit
from ustad.checkpointing import Checkpointer
from ustad.models.pretrained import load_pretrained
from ustad.train import patches, teacher
from ustad.train.teacher_steps import _backbone_inputs

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "finished teacher workdirs")
flags.DEFINE_integer("patches", 1024, "fresh patches evaluated")
flags.DEFINE_integer("seed", 12345, "crop stream (not the trainer's)")


def _stats(module, teacher_vars, decoder, crops, targets) -> dict:
    descriptors = np.asarray(jax.jit(module.apply)(teacher_vars, jnp.asarray(crops)))
    predicted = descriptors @ decoder["kernel"] + decoder["bias"]
    distillation = float(np.mean(np.sum((predicted - targets) ** 2, axis=-1)))
    variance = float(np.mean(np.sum((targets - targets.mean(0)) ** 2, axis=-1)))
    corr = np.corrcoef(descriptors, rowvar=False)
    off = corr[~np.eye(len(corr), dtype=bool)]
    return {
        "distillation": round(distillation, 3),
        "target_variance": round(variance, 3),
        "unexplained": round(distillation / variance, 4),
        "mean_abs_offdiag_corr": round(float(np.nanmean(np.abs(off))), 4),
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    device = device_name()
    for workdir in FLAGS.workdirs:
        module, teacher_vars, meta = teacher.load_teacher(workdir)
        with Checkpointer(Path(workdir) / "checkpoints") as checkpointer:
            state = checkpointer.restore_latest()[1]
        decoder = jax.tree.map(np.asarray, state["params"]["decoder"]["params"])
        backbone = load_pretrained(meta["backbone"])
        p, channels = module.patch_size, int(meta["channels"])
        key = jax.random.key(FLAGS.seed)
        with patches.ContextSampler(patches.natural_photos(), p, key) as sampler:
            crops = np.concatenate(
                [sampler.sample(s, 64) for s in range(max(1, FLAGS.patches // 64))]
            )
        if channels == 1:
            crops_in = np.asarray(patches.to_gray(jnp.asarray(crops)))
        else:
            crops_in = crops
        size = int(meta.get("backbone_input_size") or 0) or None
        features = jax.jit(
            lambda v, x, f=backbone.features_fn, c=channels, s=size: f(v, _backbone_inputs(x, c, s))
        )
        targets = np.concatenate(
            [
                np.asarray(features(backbone.variables, crops[i : i + 64]))
                for i in range(0, len(crops), 64)
            ]
        )
        trained = _stats(module, teacher_vars, decoder, crops_in, targets)
        init_vars = module.init(jax.random.key(0), jnp.zeros((1, p, p, channels)))
        untrained_decoder = {"kernel": np.zeros_like(decoder["kernel"]), "bias": targets.mean(0)}
        untrained = _stats(module, init_vars, untrained_decoder, crops_in, targets)
        checkpoint = Path(workdir) / "checkpoints"
        size_mb = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) / 2**20
        emit(
            {
                "benchmark": "teacher_quality",
                "device": device,
                "workdir": str(workdir),
                "p": p,
                "channels": channels,
                "backbone": meta["backbone"],
                "steps": int(meta["step"]),
                "patches": len(crops),
                "trained": trained,
                "untrained": untrained,
                "parameters": int(sum(x.size for x in jax.tree.leaves(teacher_vars))),
                "checkpoint_mb": round(size_mb, 2),
                "config": json.dumps({"lambda_c": meta["config"].get("lambda_c")}),
            }
        )


if __name__ == "__main__":
    flags.mark_flag_as_required("workdirs")
    app.run(main)
