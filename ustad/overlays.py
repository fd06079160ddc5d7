"""The overlay drawn for each scored image: the image | its anomaly map over it, the defect mask's
outline in cyan | a colour bar with the threshold marked (``<out>/<rel>.overlay.png`` of
:func:`ustad.score_files.score_files`, and the HTML report's panels).
"""

from __future__ import annotations

import numpy as np

from ustad.data.images import to_uint8

OVERLAY_MIN_HEIGHT = 96  # small images are enlarged so the colour bar's labels fit
COLOUR_BAR_WIDTH = 64


def overlay_size(height: int, width: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the overlay of an ``height × width`` image (PIL order)."""
    factor = max(1, -(-OVERLAY_MIN_HEIGHT // height))
    return 2 * width * factor + COLOUR_BAR_WIDTH, height * factor


def overlay_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    mask: np.ndarray | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """The image | the colour-mapped map blended 50/50 over it (the mask's contour in cyan) |
    a colour bar from ``vmin`` (bottom) to ``vmax`` (top), the threshold marked in cyan.

    Args:
        image: ``[H, W, C]`` float32 in [0, 1], C = 1 or 3.
        anomaly_map: ``[H, W]``.
        vmin, vmax: the colour scale.
        mask: ``[H, W]`` bool defect pixels, whose outline is drawn.
        threshold: the pixel threshold, marked on the bar.

    Returns:
        ``[H', 2W' + B, 3]`` uint8 (small images are enlarged to at least 96 px high so the bar's
        labels fit; B is the bar's width).
    """
    from matplotlib import colormaps

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = 0.5 * rgb + 0.5 * colormaps["inferno"](scaled)[..., :3].astype(np.float32)
    if mask is not None and mask.any():
        from scipy import ndimage

        heat[mask & ~ndimage.binary_erosion(mask, border_value=0)] = (0.0, 1.0, 1.0)
    panel = np.concatenate([rgb, heat], axis=1)
    factor = max(1, -(-OVERLAY_MIN_HEIGHT // panel.shape[0]))
    panel = np.repeat(np.repeat(panel, factor, axis=0), factor, axis=1)
    bar = _colour_bar(panel.shape[0], vmin, vmax, threshold)
    return np.concatenate([to_uint8(panel), bar], axis=1)


def _colour_bar(height: int, vmin: float, vmax: float, threshold: float | None) -> np.ndarray:
    """``[height, COLOUR_BAR_WIDTH, 3]`` uint8: the colour map (top = ``vmax``), its ends and the
    threshold labelled."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    levels = np.linspace(1.0, 0.0, height)[:, None].repeat(12, axis=1)
    strip = to_uint8(colormaps["inferno"](levels)[..., :3])
    canvas = Image.new("RGB", (COLOUR_BAR_WIDTH, height), (255, 255, 255))
    canvas.paste(Image.fromarray(strip), (2, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((16, 0), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((16, height - 11), f"{vmin:.3g}", fill=(0, 0, 0))
    if threshold is not None and vmin <= threshold <= vmax:
        y = int(round((vmax - threshold) / max(vmax - vmin, 1e-12) * (height - 1)))
        draw.line([(0, y), (15, y)], fill=(0, 200, 255), width=2)
        draw.text((16, min(max(y - 5, 12), height - 23)), f"{threshold:.3g}", fill=(0, 120, 200))
    return np.asarray(canvas)
