"""Automatic evaluator for the shapes data set: reads an image and scores it against a :class:`Scene`.

An offline stand-in for CLIP score. :func:`analyse` measures the image without knowing the caption:

* background: palette colour nearest the median of the outer ``BORDER`` pixel ring;
* foreground mask: pixels farther than ``FG_THRESHOLD`` (half the palette's smallest distance) from the background,
  cleaned by a 3x3 majority filter;
* objects: connected components of the mask dilated by ``MERGE_RADIUS`` (so a striped square's bands, whose gaps
  are narrower, join into one object, while a group's shapes, ``shapes.GAP`` apart, stay separate); objects smaller
  than ``min_area`` pixels are noise;
* colour: palette colour nearest the per-channel median of the objects' pixels;
* shape, from the largest object: ``stripes`` when its middle columns cross two or more runs; ``triangle`` when
  under ``TOP_TRIANGLE`` of it lies in the top half of its bounding box; else square when its box's corners are
  full, circle when they are empty;
* position: :func:`~ddit_export.shapes.position_of` the centroid of all object pixels.

Exact on the generator's own images at 80 px and up (at 64 px a small striped square's middle band is 1 px and the
majority filter drops it). Measured on 300 seeds: still exact after a Gaussian blur of radius 2 or 3, after radius-2
blur plus noise of sigma 40 per channel, and after a 64 px down-and-up resize; at blur radius 4, small striped squares
(7 px bands) blur into one mixed-colour block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import GAP, OPPOSITE, PALETTE, SIZES, STRIPE_BANDS, Scene, check_clip, position_of

ATTRIBUTES: tuple[str, ...] = ("background", "colour", "shape", "count", "position")
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[c] for c in _NAMES], dtype=np.float32)  # [8, 3]
_MIN_PALETTE_DIST = min(float(np.linalg.norm(a - b)) for i, a in enumerate(_RGB) for b in _RGB[i + 1 :])

BORDER = 2  # pixels of the outer ring that vote for the background
FG_THRESHOLD = _MIN_PALETTE_DIST / 2  # RGB distance from the background above which a pixel is foreground
#: Dilation radius (fraction of the side): merges gaps up to the mean of a large stripe band and the group gap.
MERGE_RADIUS = (GAP + 2 * SIZES["large"] / STRIPE_BANDS) / 4
MIN_AREA = 0.25  # an object needs this fraction of the expected single shape's area (a triangle's, the smallest)
CORNER = 0.2  # corner patch side, fraction of the object's box: a circle covers 0.14 of it, a square all
CORNER_SQUARE = 0.55  # corner occupancy above which a solid, non-triangle object is a square
RUN_PROBES = (0.3, 0.4, 0.5, 0.6, 0.7)  # columns (fractions of the object's width) counted for stripe runs
TOP_TRIANGLE = 0.375  # share of an object's pixels in the top half of its box: triangle 0.25, the others 0.5


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyse` reads from an image; ``None`` where there is no foreground object."""

    background: str
    colour: str | None
    shape: str | None
    count: int
    position: str | None
    centroid: tuple[float, float] | None  # (x, y) fractions of the side
    fill: float | None  # largest object's pixels / its bounding box
    runs: float | None  # median foreground runs down the largest object's probe columns


def to_array(image) -> np.ndarray:
    """``uint8 [H, W, 3]`` from a PIL image, a numpy ``[H, W, 3]`` array or a torch ``[3, H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu().numpy().transpose(1, 2, 0)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] (or a tensor [3, H, W]), got shape {array.shape}")
    return array.astype(np.uint8, copy=False)


def nearest_colour(rgb) -> str:
    """Palette name nearest an RGB triple."""
    return _NAMES[int(np.argmin(np.linalg.norm(_RGB - np.asarray(rgb, dtype=np.float32), axis=1)))]


def _border_pixels(rgb: np.ndarray) -> np.ndarray:
    """``[N, 3]`` pixels of the outer ``BORDER``-wide ring."""
    b = BORDER
    return np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3), rgb[b:-b, :b].reshape(-1, 3),
                           rgb[b:-b, -b:].reshape(-1, 3)])  # fmt: skip


def box_count(mask: np.ndarray, radius: int) -> np.ndarray:
    """``int32 [H, W]``: True pixels of ``mask`` in the ``(2r+1)`` square around each pixel (zero outside)."""
    out = mask.astype(np.int32)
    for axis in (0, 1):
        c = np.cumsum(np.pad(out, [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)]), axis=axis)
        n = out.shape[axis]
        out = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis) - np.take(c, np.arange(n), axis=axis)
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``[H, W]`` by a ``(2r+1)`` square."""
    return box_count(mask, radius) > 0


def clean(mask: np.ndarray) -> np.ndarray:
    """3x3 majority filter: drops isolated noise pixels, fills pinholes."""
    return box_count(mask, 1) >= 5


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean ``[H, W]`` mask: ``(labels int32 [H, W], n)``, 0 = background.

    Union-find over horizontal runs: runs of consecutive rows that share a column are joined.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive; same row-major order as the starts
    n_runs = len(rows)
    if n_runs == 0:
        return np.zeros((h, w), dtype=np.int32), 0
    parent = list(range(n_runs))
    row_first = np.searchsorted(rows, np.arange(h + 1))
    for r in range(h - 1):
        i, i_end, j, j_end = row_first[r], row_first[r + 1], row_first[r + 1], row_first[r + 2]
        while i < i_end and j < j_end:
            if starts[i] < ends[j] and starts[j] < ends[i]:
                a, b = _find(parent, i), _find(parent, j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([_find(parent, i) for i in range(n_runs)])
    _, run_label = np.unique(roots, return_inverse=True)
    start_flag = np.zeros((h, w), dtype=np.int32)
    start_flag[rows, starts] = 1
    run_index = np.cumsum(start_flag.ravel()).reshape(h, w) - 1
    labels = np.where(mask, run_label[np.maximum(run_index, 0)] + 1, 0).astype(np.int32)
    return labels, int(run_label.max()) + 1


def _count_runs(column: np.ndarray, min_gap: int) -> int:
    """Runs of True in a 1-D mask, gaps shorter than ``min_gap`` bridged."""
    idx = np.flatnonzero(column)
    if idx.size == 0:
        return 0
    return 1 + int(np.count_nonzero(np.diff(idx) > min_gap))


def classify_shape(obj: np.ndarray) -> tuple[str, float, float]:
    """``(shape, fill ratio, median probe runs)`` of one object's boolean mask cropped to its bounding box.

    Stripes: two or more runs down the middle columns. Triangle: under ``TOP_TRIANGLE`` of the pixels in the top
    half (robust to blur, which rounds the tips and raises a triangle's fill ratio). Else square when the four
    ``CORNER`` patches are more than ``CORNER_SQUARE`` full, circle otherwise (fill ratio is reported, not used: blur
    and noise move it too much).
    """
    h, w = obj.shape
    fill = float(obj.mean())
    min_gap = max(2, round(h / (4 * STRIPE_BANDS)))  # bridge gaps under a quarter of a stripe band
    runs = float(np.median([_count_runs(obj[:, min(w - 1, int(f * w))], min_gap) for f in RUN_PROBES]))
    if runs >= 2:
        return "stripes", fill, runs
    top = float(obj[: h // 2].sum() + obj[h // 2 : (h + 1) // 2].sum() / 2) / max(1, int(obj.sum()))
    if top < TOP_TRIANGLE:
        return "triangle", fill, runs
    return ("square" if _corner_occupancy(obj) > CORNER_SQUARE else "circle"), fill, runs


def _corner_occupancy(obj: np.ndarray) -> float:
    """Mean of the four ``CORNER``-sized corner patches of a boxed object mask."""
    h, w = obj.shape
    kh, kw = max(1, round(CORNER * h)), max(1, round(CORNER * w))
    patches = [obj[:kh, :kw], obj[:kh, -kw:], obj[-kh:, :kw], obj[-kh:, -kw:]]
    return float(np.mean([p.mean() for p in patches]))


def expected_area(size: str, side: int) -> float:
    """Pixel area of the smallest shape (a triangle) of ``size`` on a ``side``-pixel image."""
    return 0.5 * (2 * SIZES[size] * side) ** 2


def analyse(image, min_area: float | None = None) -> Analysis:
    """Read background, colour, shape, count and position from an image (see the module docstring).

    ``min_area``: smallest object in pixels (default ``MIN_AREA`` of a small triangle's area).
    """
    rgb = to_array(image)
    h, w = rgb.shape[:2]
    side = max(h, w)
    background = nearest_colour(np.median(_border_pixels(rgb), axis=0))
    pixels = rgb.astype(np.float32)
    mask = clean(np.linalg.norm(pixels - _RGB[_NAMES.index(background)], axis=2) > FG_THRESHOLD)
    labels, n = label_components(dilate(mask, max(1, round(MERGE_RADIUS * side))))
    labels = np.where(mask, labels, 0)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0
    min_area = MIN_AREA * expected_area("small", side) if min_area is None else min_area
    kept = np.flatnonzero(areas >= min_area)
    if kept.size == 0:
        return Analysis(background, None, None, 0, None, None, None, None)
    fg = np.isin(labels, kept)
    colour = nearest_colour(np.median(rgb[fg], axis=0))
    ys, xs = np.nonzero(fg)
    centroid = ((float(xs.mean()) + 0.5) / w, (float(ys.mean()) + 0.5) / h)
    largest = labels == int(np.argmax(areas))
    rows, cols = np.flatnonzero(largest.any(axis=1)), np.flatnonzero(largest.any(axis=0))
    crop = largest[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    shape, fill, runs = classify_shape(crop)
    return Analysis(background, colour, shape, int(kept.size), position_of(*centroid), centroid, fill, runs)


def _score(analysis: Analysis, scene: Scene, position: str | None = None, colour: str | None = None) -> dict:
    expected = {
        "background": scene.background,
        "colour": colour or scene.colour,
        "shape": scene.shape,
        "count": scene.count,
        "position": position or scene.position,
    }
    return {k: float(getattr(analysis, k) == v) for k, v in expected.items()}


def evaluate(image, scene: Scene) -> dict[str, float]:
    """Scores 0.0/1.0 for each of ``ATTRIBUTES`` plus ``score``, their mean.

    ``image``: PIL image, numpy ``uint8 [H, W, 3]`` or torch ``uint8 [3, H, W]``. Objects below ``MIN_AREA`` of
    the expected shape area (for ``scene.size``) are ignored.
    """
    rgb = to_array(image)
    analysis = analyse(rgb, MIN_AREA * expected_area(scene.size, max(rgb.shape[:2])))
    scores = _score(analysis, scene)
    scores["score"] = sum(scores.values()) / len(scores)
    return scores


def evaluate_frames(
    frames, scene: Scene, motion: str | None = None, second_colour: str | None = None
) -> dict[str, float]:
    """Per-frame :func:`evaluate` scores averaged over a clip, plus ``motion`` (0/1) when ``motion`` is given.

    ``move`` (see :func:`~ddit_export.shapes.render_clip`): position is scored on the first frame (the scene's)
    and the last (the opposite side) only; ``motion`` = 1 when the centroid advances monotonically along the axis.
    ``recolour``: frames from ``len(frames) // 2`` on expect ``second_colour``; ``motion`` = 1 when the first and
    last frames show the two colours. ``score`` is the mean of all the other keys.
    """
    second = check_clip(scene, motion, second_colour) if motion else None
    analyses, per_frame = _per_frame(frames, scene, motion, second_colour)
    scores = {k: float(np.mean([s[k] for s in per_frame])) for k in ATTRIBUTES}
    if motion == "move":
        scores["position"] = (per_frame[0]["position"] + per_frame[-1]["position"]) / 2
        scores["motion"] = float(_monotonic(analyses, scene.position))
    elif motion == "recolour":
        scores["motion"] = float(analyses[0].colour == scene.colour and analyses[-1].colour == second)
    scores["score"] = sum(scores.values()) / len(scores)
    return scores


def frame_scores(frames, scene: Scene, motion: str | None = None, second_colour: str | None = None) -> list[float]:
    """Per frame, the mean of its attribute scores (what that frame is expected to show, as in ``evaluate_frames``).
    The middle frames of a ``move`` clip are in transit, so their position is not scored."""
    per_frame = _per_frame(frames, scene, motion, second_colour)[1]
    out = []
    for i, scores in enumerate(per_frame):
        if motion == "move" and 0 < i < len(per_frame) - 1:
            scores = {k: v for k, v in scores.items() if k != "position"}
        out.append(sum(scores.values()) / len(scores))
    return out


def _per_frame(frames, scene: Scene, motion: str | None, second_colour: str | None):
    """(analyses, per-frame attribute scores) of a clip."""
    second = check_clip(scene, motion, second_colour) if motion else None
    n = len(frames)
    side = max(to_array(frames[0]).shape[:2])
    analyses = [analyse(f, MIN_AREA * expected_area(scene.size, side)) for f in frames]
    per_frame = []
    for i, a in enumerate(analyses):
        colour = second if motion == "recolour" and i >= n // 2 else None
        position = OPPOSITE[scene.position] if motion == "move" and i == n - 1 and n > 1 else None
        per_frame.append(_score(a, scene, position, colour))
    return analyses, per_frame


def _monotonic(analyses: list[Analysis], start: str) -> bool:
    """Whether the centroid moves away from ``start`` frame after frame (1% of the side of backward slack)."""
    if any(a.centroid is None for a in analyses):
        return False
    axis = 0 if start in ("left", "right") else 1
    sign = 1 if start in ("left", "top") else -1
    coords = [sign * a.centroid[axis] for a in analyses]
    return (
        len(coords) > 1
        and all(b >= a - 0.01 for a, b in zip(coords, coords[1:], strict=False))
        and (coords[-1] > coords[0])
    )
