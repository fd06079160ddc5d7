"""The score normalisation of trained students, old against new, on a labelled category
(issue 21 item 4): per scale and multi-scale image AUROC, pixel AUROC and AU-PRO@0.3 with

* ``moments``: e and v normalised by their mean and σ on the held-out good images (the paper's;
  every workdir written before issue 21), all scales averaged;
* ``quantile``: by the median and robust spread (the new default), all scales averaged;
* ``quantile+guard``: the same, scales whose pseudo-defect AUROC on held-out good images is below
  0.5 left out of the multi-scale mean (what ``ustad score`` / ``ustad evaluate`` now do).

Both sets of statistics come from one training run: its metadata records the mean/σ next to the
quantiles. The test images are scored once per scale (e and v, at the students' training size,
as ``ustad evaluate`` does); the normalisations are applied to those maps on the host, checked
equal to :class:`ustad.uninformed_students.score.Detector` on the first images. One JSON line per
(normalisation, score set), appended to ``--out``::

    python -m benchmarks.robust_normalisation --workdir runs/robustnorm_bottle_s300 \\
        --data ../shared/data/mvtec_ad/bottle --label bottle_cpu_s300 \\
        --out benchmarks/results/robust_normalisation_cpu.jsonl
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a trained (multi-scale) students workdir")
flags.DEFINE_string("data", "../shared/data/mvtec_ad/bottle", "an MVTec-layout category folder")
flags.DEFINE_integer("batch_size", 8, "images per scoring call")
flags.DEFINE_string("label", "", "a name for the run in the lines (default: the workdir)")
flags.DEFINE_string("out", "", "JSON-lines file to append to (default: stdout only)")
flags.DEFINE_bool("time_check", True, "time the pseudo-defect check again after compiling it")


def moments_of(workdir) -> dict:
    """``{patch_size: ScoreNormalization}`` of the mean/σ recorded by each scale's training."""
    from ustad.checkpointing import restore_workdir
    from ustad.ensemble import ScoreNormalization
    from ustad.uninformed_students.checkpoints import FORMAT, find_scale_dirs

    found = {}
    for scale_dir in find_scale_dirs(workdir):
        _, _, meta = restore_workdir(scale_dir, (FORMAT,), hint="")
        record = meta.get("score_statistics")
        if record is None:
            raise ValueError(f"{scale_dir} has no score_statistics (trained before issue 21)")
        found[meta["patch_size"]] = ScoreNormalization(
            record["error"]["mean"], record["error"]["std"],
            record["variance"]["mean"], record["variance"]["std"],
        )  # fmt: skip
    return found


def error_variance(scale, images, batch_size):
    """``(e, v)`` ``[N, H, W]`` float32 of one scale on ``images`` (at its training size)."""
    import jax
    import numpy as np

    from ustad.detector import score_in_batches
    from ustad.uninformed_students.maps import error_and_variance

    fn = jax.jit(
        lambda params, x: jax.numpy.stack(
            error_and_variance(scale.network, scale.network, params, x, scale.padding), axis=-1
        )
    )
    both = score_in_batches(fn, (jax.device_put(scale.params),), images, batch_size)
    return np.asarray(both[..., 0]), np.asarray(both[..., 1])


def metrics(maps, test) -> dict:
    import numpy as np

    from ustad.evaluation.metrics import au_pro, image_auroc, pixel_auroc

    scores = maps.reshape(len(maps), -1).max(axis=1)
    return {
        "image_auroc": round(image_auroc(scores, test.labels), 4),
        "pixel_auroc": round(pixel_auroc(maps, test.masks), 4),
        "au_pro": round(float(au_pro(maps, test.masks, 0.3)), 4),
        "good_max_median": round(float(np.median(scores[test.labels == 0])), 3),
    }


def main(argv):
    del argv
    import numpy as np

    from benchmarks.common import device_name
    from ustad.data.mvtec import load_mvtec_test
    from ustad.ensemble import normalized_score
    from ustad.uninformed_students.checkpoints import find_scale_dirs, load_scale
    from ustad.uninformed_students.score import Detector, select_scales

    start = time.perf_counter()
    scales = [load_scale(d) for d in find_scale_dirs(FLAGS.workdir)]
    moments = moments_of(FLAGS.workdir)
    test = load_mvtec_test(FLAGS.data, image_size=list(scales[0].image_size))
    ev = {s.patch_size: error_variance(s, test.images, FLAGS.batch_size) for s in scales}

    def scale_map(scale, normalization):
        e, v = ev[scale.patch_size]
        return np.asarray(normalized_score(e, v, np.asarray(normalization, np.float32)))

    # The host maps are the detector's (the robust statistics, one scale, first images).
    first = test.images[:4]
    for scale in scales:
        expected = Detector([scale], batch_size=FLAGS.batch_size).score(first)[0]
        np.testing.assert_allclose(
            scale_map(scale, scale.normalization)[:4], expected, rtol=1e-4, atol=1e-4
        )
    # The guard's cost and its value on the test set's good images (not the held-out ones).
    from ustad.uninformed_students.maps import pseudo_anomaly_auroc

    check = {}
    for scale in scales:
        run = functools.partial(
            pseudo_anomaly_auroc, scale.network, scale.network, scale.params,
            scale.normalization, test.images[test.labels == 0], batch_size=FLAGS.batch_size,
            padding=scale.padding,
        )  # fmt: skip
        t0 = time.perf_counter()
        auroc = run()["image_auroc"]
        if FLAGS.time_check:  # again, without the compilation
            t0 = time.perf_counter()
            auroc = run()["image_auroc"]
        check[f"p{scale.patch_size}"] = {
            "test_good_pseudo_auroc": round(auroc, 4),
            "seconds": round(time.perf_counter() - t0, 2),
            "seconds_include_compilation": not FLAGS.time_check,
        }
    variants = {
        "moments": ({s.patch_size: moments[s.patch_size] for s in scales}, tuple(scales)),
        "quantile": ({s.patch_size: s.normalization for s in scales}, tuple(scales)),
        "quantile+guard": ({s.patch_size: s.normalization for s in scales}, select_scales(scales)),
    }
    label = FLAGS.label or FLAGS.workdir
    lines = []
    for variant, (norms, kept) in variants.items():
        maps = {f"p{s.patch_size}": scale_map(s, norms[s.patch_size]) for s in scales}
        if len(scales) > 1:
            maps["multiscale"] = np.mean([maps[f"p{s.patch_size}"] for s in kept], axis=0)
        for name, m in maps.items():
            if variant == "quantile+guard" and name != "multiscale":
                continue  # the guard changes only the mean of several scales
            line = {
                "benchmark": "robust_normalisation",
                "label": label,
                "normalisation": variant,
                "scores": name,
                **metrics(m, test),
                "scales_averaged": [f"p{s.patch_size}" for s in kept]
                if name == "multiscale"
                else None,
                "pseudo_auroc": {f"p{s.patch_size}": s.pseudo_auroc for s in scales},
                "pseudo_check_on_test_good": check,
                "normalisation_values": {
                    f"p{s.patch_size}": [round(float(x), 4) for x in norms[s.patch_size]]
                    for s in scales
                },
                "image_size": list(scales[0].image_size),
                "test_images": len(test.images),
                "device": device_name(),
            }
            lines.append(line)
            print(json.dumps(line), flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    print(f"# {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
