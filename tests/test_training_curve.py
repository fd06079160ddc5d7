"""In-training evaluation: the figures of raw and smoothed maps, and the steps of an epoch."""

import numpy as np

from ustad.data.pipeline import num_batches
from ustad.uninformed_students.crops import crop_steps_per_epoch
from ustad.uninformed_students.training_curve import map_figures, steps_per_epoch


def test_map_figures_of_perfect_maps_raw_and_smoothed():
    masks = np.zeros((4, 16, 16), bool)
    masks[2:, 4:9, 5:10] = True
    labels = np.array([0, 0, 1, 1])
    figures = map_figures(masks.astype(np.float32), masks, labels, sigma=1.0)
    assert set(figures) == {"raw", "smoothed_sigma1"}
    assert figures["raw"] == {"au_pro": 1.0, "pixel_auroc": 1.0, "image_auroc": 1.0}
    assert set(map_figures(masks.astype(np.float32), masks, labels, sigma=0)) == {"raw"}


def test_steps_per_epoch_whole_images_or_crops():
    assert steps_per_epoch(10, (64, 64), 0, 3) == num_batches(10, 3)
    assert steps_per_epoch(10, (64, 64), 32, 3) == crop_steps_per_epoch(10, (64, 64), 32, 3)
