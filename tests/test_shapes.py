"""The procedural shapes data set (ddit_export.shapes) and its automatic evaluator (ddit_export.evaluator)."""

import itertools
import random
import time
from collections import deque
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ddit_export import evaluator as ev
from ddit_export import shapes as sh
from ddit_export.shapes import Scene


def _examples(n: int, size: int = 256, start: int = 0):
    """(image, caption, scene) for seeds start..start+n, a tenth of them forced simple."""
    return [sh.make_example(seed, size, simple=True if seed % 10 == 0 else None) for seed in range(start, start + n)]


# ---------------------------------------------------------------- data set


def test_palette_is_well_separated():
    rgb = np.array(list(sh.PALETTE.values()), dtype=float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert len(sh.PALETTE) == 8 and min(dists) >= 255
    assert {"black", "white"} <= set(sh.PALETTE)


def test_caption_wording():
    assert Scene("black", "red", "circle").caption() == "a red circle on a black background"
    assert Scene("black", "red", "circle").caption("full") == "one large red circle in the center of a black background"
    two = Scene("black", "red", "circle", 2, "left")
    assert two.caption() == "two large red circles on the left of a black background"
    assert two.caption("minimal") == "two red circles on the left of a black background"
    stripes = Scene("white", "blue", "stripes", 3, "top", "small")
    assert stripes.caption() == "three small blue striped squares at the top of a white background"
    assert Scene("green", "yellow", "triangle", 1, "bottom", "small").caption("minimal") == (
        "a small yellow triangle at the bottom of a green background"
    )
    assert (
        Scene("cyan", "magenta", "square", 4).caption()
        == "four large magenta squares in the center of a cyan background"
    )
    with pytest.raises(ValueError, match="caption style"):
        two.caption("fancy")


def test_vocabulary_covers_every_caption():
    vocab = set(sh.VOCABULARY)
    assert sh.VOCABULARY == sorted(vocab) and all(w == w.lower() for w in vocab)
    seen = set()
    rng = random.Random(0)
    for seed in range(3000):
        scene = sh.scene_from_seed(seed)
        captions = [scene.caption(style) for style in sh.CAPTION_STYLES]
        captions.append(sh.make_example(seed, size=16)[1])
        if scene.position in sh.OPPOSITE:
            captions.append(sh.clip_caption(scene, "move", style=rng.choice(sh.CAPTION_STYLES)))
        second = rng.choice([c for c in sh.COLOURS if c not in (scene.background, scene.colour)])
        captions.append(sh.clip_caption(scene, "recolour", second, style=rng.choice(sh.CAPTION_STYLES)))
        for caption in captions:
            words = caption.lower().split()
            assert set(words) <= vocab, caption
            seen.update(words)
    assert seen == vocab - {"an"}  # no palette colour or size starts with a vowel
    assert len(vocab) == 38


def test_caption_round_trip_all_styles():
    for seed in range(1500):
        scene = sh.scene_from_seed(seed, simple=True if seed % 7 == 0 else None)
        for style in sh.CAPTION_STYLES:
            assert sh.caption_attributes(scene.caption(style)) == scene
    assert sh.caption_attributes("  A Red   Circle on a BLACK background. ") == Scene("black", "red", "circle")


@pytest.mark.parametrize(
    "caption",
    [
        "a purple circle on a black background",  # not in the palette
        "two red circle on the left of a black background",  # plural mismatch
        "a red circles on a black background",
        "a red striped circle on a black background",
        "a red circle on a red background",  # colour == background
        "four large red circles on the left of a black background",  # does not fit
        "a red circle",
        "a red circle on the middle of a black background",
    ],
)
def test_caption_attributes_rejects(caption):
    with pytest.raises(ValueError):
        sh.caption_attributes(caption)


def test_scene_validation():
    with pytest.raises(ValueError, match="both"):
        Scene("red", "red", "circle")
    for bad in (dict(shape="star"), dict(count=5), dict(position="corner"), dict(size="huge"), dict(colour="grey")):
        with pytest.raises(ValueError):
            replace(Scene("black", "red", "circle"), **bad)
    with pytest.raises(ValueError, match="fit"):
        Scene("black", "red", "circle", 3, "left", "large")
    assert Scene("black", "red", "circle", 3, "left", "small").count == 3


def test_layout_and_regions():
    for size, count, pos in itertools.product(sh.SIZES, sh.COUNTS, sh.POSITIONS):
        offsets = sh.layout(count, pos, size)
        assert len(offsets) == count
        assert np.allclose(np.sum(offsets, axis=0), 0.0)  # the group centroid is the target
    for pos, (x, y) in sh.TARGETS.items():
        for dx, dy in itertools.product((-sh.JITTER, 0, sh.JITTER), repeat=2):
            assert sh.position_of(x + dx, y + dy) == pos
    assert sh.position_of(0.3, 0.45) == "left" and sh.position_of(0.55, 0.9) == "bottom"
    large_fit = {(c, p) for c in sh.COUNTS for p in sh.POSITIONS if sh.fits(c, p, "large")}
    assert large_fit == {(c, p) for c in (1, 2) for p in sh.POSITIONS} | {(3, "center"), (4, "center")}
    assert all(sh.fits(c, p, "small") for c in sh.COUNTS for p in sh.POSITIONS)


def test_sample_scene():
    rng = random.Random(1)
    scenes = [sh.sample_scene(rng) for _ in range(3000)]
    assert all(s.background != s.colour for s in scenes)
    for field, values in [
        ("background", sh.COLOURS),
        ("colour", sh.COLOURS),
        ("shape", sh.SHAPES),
        ("count", sh.COUNTS),
        ("position", sh.POSITIONS),
        ("size", tuple(sh.SIZES)),
    ]:
        assert {getattr(s, field) for s in scenes} == set(values), field
    assert all(sh.sample_scene(rng, simple=True).is_simple for _ in range(200))
    assert not any(sh.sample_scene(rng, simple=False).is_simple for _ in range(200))
    assert sh.scene_from_seed(42) == sh.scene_from_seed(42) == sh.make_example(42)[2]
    assert sh.make_example(42)[1] == sh.scene_from_seed(42).caption()


def test_render_exact_flat_colours_and_deterministic():
    for image, _, scene in _examples(100):
        assert image.mode == "RGB" and image.size == (256, 256)
        rgb = np.asarray(image)
        packed = np.unique(rgb.reshape(-1, 3).astype(np.int32) @ np.array([65536, 256, 1]))
        expected = {r * 65536 + g * 256 + b for r, g, b in (sh.PALETTE[scene.background], sh.PALETTE[scene.colour])}
        assert set(packed.tolist()) == expected  # exact flat colours, no antialiasing
        ring = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3)])
        assert (ring == sh.PALETTE[scene.background]).all()  # shapes keep off the border
    a, b = sh.make_example(7)[0], sh.make_example(7)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    scene = sh.scene_from_seed(7)
    jittered = {np.asarray(sh.render(scene, rng=random.Random(s))).tobytes() for s in range(5)}
    assert len(jittered) > 1  # the rng moves the group


@pytest.mark.parametrize(
    ("shape", "fill"), [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5), ("stripes", 0.6)]
)
def test_render_geometry(shape, fill):
    image = sh.render(Scene("black", "white", shape), size=256)
    ys, xs = np.nonzero(np.asarray(image)[..., 0])
    side = round(2 * sh.SIZES["large"] * 256)
    assert xs.size == pytest.approx(fill * side**2, rel=0.04)
    assert (xs.mean() + 0.5) / 256 == pytest.approx(0.5, abs=2 / 256)  # area centroid on the target
    assert (ys.mean() + 0.5) / 256 == pytest.approx(0.5, abs=2 / 256)
    assert xs.max() - xs.min() + 1 == side


# ---------------------------------------------------------------- evaluator


def test_evaluator_exact_on_generated_images():
    examples = _examples(400) + _examples(100, size=128, start=400)
    assert sum(s.is_simple for *_, s in examples) >= 50 and sum(not s.is_simple for *_, s in examples) >= 300
    for image, caption, scene in examples:
        scores = ev.evaluate(image, scene)
        assert set(scores) == {*ev.ATTRIBUTES, "score"}
        assert scores["score"] == 1.0, (caption, scores, ev.analyse(image))


def test_evaluator_input_types():
    image, _, scene = sh.make_example(3)
    array = np.asarray(image)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    assert ev.evaluate(image, scene) == ev.evaluate(array, scene) == ev.evaluate(tensor, scene)
    assert ev.evaluate(image, scene)["score"] == 1.0
    with pytest.raises(ValueError, match="RGB"):
        ev.evaluate(array[..., 0], scene)


def _other(scene: Scene, field: str, rng: random.Random) -> Scene | None:
    """The scene with ``field`` changed to another value that still makes a valid scene (None if there is none)."""
    values = {
        "background": sh.COLOURS,
        "colour": sh.COLOURS,
        "shape": sh.SHAPES,
        "count": sh.COUNTS,
        "position": sh.POSITIONS,
    }[field]
    candidates = []
    for v in values:
        if v == getattr(scene, field):
            continue
        try:
            candidates.append(replace(scene, **{field: v}))
        except ValueError:
            pass
    return rng.choice(candidates) if candidates else None


def test_evaluator_scores_wrong_attributes_zero():
    rng = random.Random(0)
    checked = 0
    for image, _, scene in _examples(100, start=1000):
        for field in ev.ATTRIBUTES:
            wrong = _other(scene, field, rng)
            if wrong is None:  # e.g. a large group of three only fits in the center
                continue
            checked += 1
            scores = ev.evaluate(image, wrong)
            assert scores[field] == 0.0, (field, scene, wrong)
            assert scores["score"] == pytest.approx(0.8)  # only the changed attribute is wrong
    assert checked >= 450


def test_evaluator_blank_image():
    scene = Scene("black", "red", "circle", 2, "left")
    scores = ev.evaluate(Image.new("RGB", (256, 256), sh.PALETTE["black"]), scene)
    assert scores == {"background": 1.0, "colour": 0.0, "shape": 0.0, "count": 0.0, "position": 0.0, "score": 0.2}
    assert ev.evaluate(Image.new("RGB", (256, 256), sh.PALETTE["white"]), scene)["score"] == 0.0


def _accuracy(examples, degrade) -> dict[str, float]:
    totals = dict.fromkeys(ev.ATTRIBUTES, 0.0)
    for seed, (image, _, scene) in enumerate(examples):
        scores = ev.evaluate(degrade(image, seed), scene)
        for k in totals:
            totals[k] += scores[k]
    return {k: v / len(examples) for k, v in totals.items()}


def test_evaluator_robust_to_blur():
    """Measured on seeds 2000..2099: 1.00 on every attribute at radius 2 (and at 3)."""
    acc = _accuracy(_examples(100, start=2000), lambda im, _: im.filter(ImageFilter.GaussianBlur(2)))
    assert acc["background"] >= 0.95 and acc["colour"] >= 0.95
    assert min(acc.values()) >= 0.9, acc


def test_evaluator_robust_to_noise():
    """Gaussian noise sigma 40 per channel after a radius-2 blur: measured 1.00 on every attribute."""

    def noisy(image, seed):
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
        noise = np.random.default_rng(seed).normal(0, 40, blurred.shape)
        return np.clip(blurred + noise, 0, 255).astype(np.uint8)

    assert min(_accuracy(_examples(60, start=3000), noisy).values()) >= 0.9


def _bfs_count(mask: np.ndarray) -> list[int]:
    """Sorted component sizes by plain BFS (4-connected), the reference for label_components."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start], queue, n = True, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            n += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        sizes.append(n)
    return sorted(sizes)


def test_label_components_matches_bfs():
    rng = np.random.default_rng(0)
    for density in (0.1, 0.4, 0.6):
        mask = rng.random((40, 53)) < density
        labels, n = ev.label_components(mask)
        assert (labels > 0).sum() == mask.sum() and ((labels > 0) == mask).all()
        assert sorted(np.bincount(labels.ravel())[1:].tolist()) == _bfs_count(mask) and n == len(_bfs_count(mask))
    assert ev.label_components(np.zeros((5, 5), bool))[1] == 0


def test_dilate_matches_naive():
    mask = np.random.default_rng(1).random((30, 37)) < 0.03
    for r in (1, 3):
        naive = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask), strict=True):
            naive[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] = True
        assert (ev.dilate(mask, r) == naive).all()


# ---------------------------------------------------------------- clips


def test_move_clip():
    scene = Scene("black", "red", "circle", 2, "left", "large")
    frames = sh.render_clip(scene, frames=9, size=128, motion="move", seed=3)
    assert len(frames) == 9 and all(f.size == (128, 128) for f in frames)
    first, last = ev.analyse(frames[0]), ev.analyse(frames[-1])
    assert (first.position, last.position) == ("left", "right")
    xs = [ev.analyse(f).centroid[0] for f in frames]
    assert xs == sorted(xs) and xs[0] == pytest.approx(0.25, abs=0.01) and xs[-1] == pytest.approx(0.75, abs=0.01)
    scores = ev.evaluate_frames(frames, scene, "move")
    assert scores["score"] == 1.0 and scores["motion"] == 1.0
    assert ev.evaluate_frames(frames[::-1], scene, "move")["motion"] == 0.0
    assert sh.clip_caption(Scene("black", "red", "circle", 1, "left"), "move") == (
        "a red circle moving from left to right on a black background"
    )
    assert sh.clip_caption(replace(scene, position="bottom"), "move") == (
        "two large red circles moving from bottom to top on a black background"
    )
    with pytest.raises(ValueError, match="center"):
        sh.render_clip(Scene("black", "red", "circle"), 4, motion="move")


def test_move_clips_for_many_scenes():
    for seed in range(40):
        scene = sh.scene_from_seed(seed, simple=False)
        if scene.position == "center":
            continue
        frames = sh.render_clip(scene, frames=5, size=128, motion="move", seed=seed)
        assert ev.evaluate_frames(frames, scene, "move")["score"] == 1.0, scene
        assert ev.frame_scores(frames, scene, "move") == [1.0] * 5, scene


def test_frame_scores_follow_what_each_frame_should_show():
    scene = Scene("white", "red", "triangle", 3, "top", "small")
    frames = sh.render_clip(scene, frames=8, size=128, motion="recolour", seed=1, second_colour="blue")
    assert ev.frame_scores(frames, scene, "recolour", "blue") == [1.0] * 8
    # expecting green after the switch: the last four frames lose their colour point (1 of 5 attributes)
    assert ev.frame_scores(frames, scene, "recolour", "green") == [1.0] * 4 + [0.8] * 4
    moving = Scene("black", "red", "circle", 2, "left", "large")
    clip = sh.render_clip(moving, frames=5, size=128, motion="move", seed=3)
    # played backwards: the first and last frames sit on the wrong sides; the middle ones are not scored on position
    assert ev.frame_scores(clip[::-1], moving, "move") == [0.8, 1.0, 1.0, 1.0, 0.8]


def test_recolour_clip():
    scene = Scene("white", "red", "triangle", 3, "top", "small")
    frames = sh.render_clip(scene, frames=8, size=128, motion="recolour", seed=1, second_colour="blue")
    colours = [ev.analyse(f).colour for f in frames]
    assert colours == ["red"] * 4 + ["blue"] * 4
    assert {ev.analyse(f).position for f in frames} == {"top"}
    scores = ev.evaluate_frames(frames, scene, "recolour", "blue")
    assert scores["score"] == 1.0 and scores["motion"] == 1.0
    assert ev.evaluate_frames(frames, scene, "recolour", "green")["motion"] == 0.0
    assert sh.clip_caption(scene, "recolour", "blue") == (
        "three small red triangles turning blue at the top of a white background"
    )
    simple = Scene("black", "red", "circle")
    assert (
        sh.clip_caption(simple, "recolour")
        == f"a red circle turning {sh.default_second_colour(simple)} on a black background"
    )
    with pytest.raises(ValueError, match="second colour"):
        sh.render_clip(scene, 4, motion="recolour", second_colour="white")
    with pytest.raises(ValueError, match="motion"):
        sh.clip_caption(scene, "spin")


def test_evaluate_frames_without_motion():
    frames = [sh.render(sh.scene_from_seed(5), rng=random.Random(s)) for s in range(3)]
    scores = ev.evaluate_frames(frames, sh.scene_from_seed(5))
    assert scores["score"] == 1.0 and "motion" not in scores


# ---------------------------------------------------------------- speed


def test_render_and_evaluate_are_fast():
    examples = _examples(20, start=5000)
    render_s, eval_s = [], []
    for seed, (image, _, scene) in enumerate(examples):
        t0 = time.perf_counter()
        sh.render(scene, 256, random.Random(seed))
        t1 = time.perf_counter()
        ev.evaluate(image, scene)
        t2 = time.perf_counter()
        render_s.append(t1 - t0)
        eval_s.append(t2 - t1)
    assert np.median(render_s) < 0.010 and np.median(eval_s) < 0.050
