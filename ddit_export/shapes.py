"""Procedural caption -> image data set: flat-coloured shapes on a flat background, generated from a seed.

A :class:`Scene` is one shape type in one colour, repeated ``count`` times, on a background colour. Every image is
drawn without antialiasing, in exact palette colours, so :mod:`ddit_export.evaluator` can read it back exactly.

Geometry (all lengths are fractions of the image side ``S``):

* a shape fills a ``2h x 2h`` box, ``h = SIZES[size]`` (small 0.07, large 0.14); a circle is the box's inscribed disc,
  a triangle points up (base and height ``2h``), ``stripes`` is the box filled with ``STRIPE_BANDS`` (5) horizontal
  bands, alternately shape colour and background colour, starting and ending with the shape colour;
* the group's pixel centroid is placed at ``TARGETS[position]`` plus a uniform jitter of at most ``JITTER`` per axis
  (triangles are shifted so their area centroid, not their box, sits on the layout point);
* ``count > 1``: the shapes are laid out ``GAP`` apart (box to box) along the axis across the position (a column on
  the left/right, a row at the top/bottom/center), in a triangle formation for three in the center, and in a 2x2 grid
  for four. Large groups of three or four only fit in the center (:func:`fits`); :class:`Scene` rejects the rest;
* :func:`position_of` maps a centroid to a region; generator and evaluator share it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

#: Named colours (RGB cube corners: every pair is at least 255 apart in RGB).
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "stripes")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
#: Half-extent of one shape's box, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.07, "large": 0.14}
CAPTION_STYLES: tuple[str, ...] = ("auto", "minimal", "full")
MOTIONS: tuple[str, ...] = ("move", "recolour")

#: Where the group's centroid is placed, as (x, y) fractions of the image side (y grows downwards).
TARGETS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
CENTER_HALF = 0.125  # centroid within this Chebyshev distance of the image centre -> "center"
JITTER = 0.025  # max group offset per axis from its target
GAP = 0.1  # box-to-box gap between shapes of one group
MARGIN = 0.01  # min distance from any shape box to the image border
STRIPE_BANDS = 5

COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
NOUNS: dict[str, tuple[str, str]] = {
    "circle": ("circle", "circles"),
    "square": ("square", "squares"),
    "triangle": ("triangle", "triangles"),
    "stripes": ("striped square", "striped squares"),
}
LOCATIONS: dict[str, str] = {
    "center": "in the center of",
    "left": "on the left of",
    "right": "on the right of",
    "top": "at the top of",
    "bottom": "at the bottom of",
}
_CLIP_WORDS = ("moving", "from", "to", "turning")


def _vocabulary() -> list[str]:
    phrases = ["a an on background", *COLOURS, *COUNT_WORDS.values(), *SIZES, *LOCATIONS.values(), *_CLIP_WORDS]
    phrases += [" ".join(pair) for pair in NOUNS.values()]
    return sorted({w for p in phrases for w in p.split()})


#: Every word any caption (:meth:`Scene.caption`, :func:`clip_caption`) can contain, lower-case, sorted.
VOCABULARY: list[str] = _vocabulary()


def position_of(x: float, y: float) -> str:
    """Region of a centroid ``(x, y)`` (fractions of the image side): center if within ``CENTER_HALF`` of the middle
    on both axes, else the side the larger offset points to (ties go to left/right)."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < CENTER_HALF:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def layout(count: int, position: str, size: str) -> list[tuple[float, float]]:
    """Offsets ``(dx, dy)`` of each shape's centroid from the group centroid (they sum to zero), ``count`` entries."""
    d = 2 * SIZES[size] + GAP  # centre-to-centre spacing
    across_x = position in ("top", "bottom", "center")  # line direction: across the position's axis
    if count == 1:
        return [(0.0, 0.0)]
    if count == 4:
        return [(sx * d / 2, sy * d / 2) for sy in (-1, 1) for sx in (-1, 1)]
    if count == 3 and position == "center":
        return [(0.0, -2 * d / 3), (-d / 2, d / 3), (d / 2, d / 3)]
    steps = [i - (count - 1) / 2 for i in range(count)]
    return [(s * d, 0.0) if across_x else (0.0, s * d) for s in steps]


def fits(count: int, position: str, size: str) -> bool:
    """Whether the group stays ``MARGIN`` inside the image for every jitter (and the triangle's centroid shift)."""
    h = SIZES[size]
    tx, ty = TARGETS[position]
    lo, hi = MARGIN + JITTER, 1 - MARGIN - JITTER
    for dx, dy in layout(count, position, size):
        x, y = tx + dx, ty + dy  # a triangle's box reaches 4h/3 above its centroid, 2h/3 below
        if x - h < lo or x + h > hi or y - 4 * h / 3 < lo or y + h > hi:
            return False
    return True


@dataclass(frozen=True)
class Scene:
    """``count`` shapes of type ``shape`` in ``colour`` on a ``background``, grouped at ``position``."""

    background: str
    colour: str
    shape: str
    count: int = 1
    position: str = "center"
    size: str = "large"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("background", self.background, COLOURS),
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("count", self.count, COUNTS),
            ("position", self.position, POSITIONS),
            ("size", self.size, tuple(SIZES)),
        ):
            if value not in allowed:
                raise ValueError(f"scene {name} {value!r} is not one of {allowed}")
        if self.background == self.colour:
            raise ValueError(f"scene colour and background are both {self.colour!r}")
        if not fits(self.count, self.position, self.size):
            raise ValueError(f"{self.count} {self.size} shapes do not fit at {self.position!r} (only in the center)")

    @property
    def is_simple(self) -> bool:
        """One large shape in the center: the scene a caption can describe by colours and shape alone."""
        return self.count == 1 and self.position == "center" and self.size == "large"

    def caption(self, style: str = "auto") -> str:
        """Caption in one of ``CAPTION_STYLES``.

        ``minimal`` leaves out every default (one -> "a", large, center): "a red circle on a black background",
        "two red circles on the left of a black background". ``full`` names everything: "one large red circle in
        the center of a black background". ``auto`` is ``minimal`` for simple scenes and ``full`` otherwise.
        """
        minimal = _is_minimal(style, self.is_simple)
        location = "on" if minimal and self.position == "center" else LOCATIONS[self.position]
        return f"{_subject(self, minimal)} {location} {_article(self.background)} {self.background} background"


def _is_minimal(style: str, simple: bool) -> bool:
    if style not in CAPTION_STYLES:
        raise ValueError(f"caption style {style!r} is not one of {CAPTION_STYLES}")
    return style == "minimal" or (style == "auto" and simple)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _subject(scene: Scene, minimal: bool) -> str:
    """ "two small red circles", "a red circle" (minimal: one -> a, large left out)."""
    words = [scene.size] if not (minimal and scene.size == "large") else []
    words += [scene.colour, NOUNS[scene.shape][scene.count > 1]]
    first = _article(words[0]) if minimal and scene.count == 1 else COUNT_WORDS[scene.count]
    return " ".join([first, *words])


def _caption_pattern() -> re.Pattern[str]:
    alt = "|".join
    nouns = alt(re.escape(w) for pair in NOUNS.values() for w in pair)
    return re.compile(
        rf"(?P<count>a|an|{alt(COUNT_WORDS.values())}) (?:(?P<size>{alt(SIZES)}) )?(?P<colour>{alt(COLOURS)})"
        rf" (?P<noun>{nouns}) (?P<location>on|{alt(LOCATIONS.values())}) (?:a|an) (?P<background>{alt(COLOURS)})"
        r" background"
    )


_CAPTION_RE = _caption_pattern()
_NOUN_TO_SHAPE = {w: (shape, plural) for shape, pair in NOUNS.items() for plural, w in enumerate(pair)}
_LOCATION_TO_POSITION = {phrase: pos for pos, phrase in LOCATIONS.items()} | {"on": "center"}


def caption_attributes(caption: str) -> Scene:
    """Parse a caption of any ``CAPTION_STYLES`` back into its :class:`Scene` (omitted: one, large, center).

    Case, surrounding whitespace and a final full stop are ignored. Raises ``ValueError`` for anything else,
    including a singular noun after a count above one (or the reverse).
    """
    text = " ".join(caption.lower().split()).rstrip(".")
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"caption {caption!r} is not in the shapes data set grammar")
    count = 1 if m["count"] in ("a", "an") else {w: n for n, w in COUNT_WORDS.items()}[m["count"]]
    shape, plural = _NOUN_TO_SHAPE[m["noun"]]
    if plural != (count > 1):
        raise ValueError(f"caption {caption!r}: {m['count']!r} does not agree with {m['noun']!r}")
    return Scene(
        background=m["background"],
        colour=m["colour"],
        shape=shape,
        count=count,
        position=_LOCATION_TO_POSITION[m["location"]],
        size=m["size"] or "large",
    )


def sample_scene(rng: random.Random, simple: bool | None = None) -> Scene:
    """A random scene: colours, shape, count and size uniform, position uniform over those the group fits.

    ``simple=True``: one large shape in the center; ``False``: any other scene; ``None``: either.
    """
    background, colour = rng.sample(COLOURS, 2)
    shape = rng.choice(SHAPES)
    if simple:
        return Scene(background, colour, shape)
    while True:
        count, size = rng.choice(COUNTS), rng.choice(tuple(SIZES))
        position = rng.choice([p for p in POSITIONS if fits(count, p, size)])
        scene = Scene(background, colour, shape, count, position, size)
        if simple is None or not scene.is_simple:
            return scene


def scene_from_seed(seed: int, simple: bool | None = None) -> Scene:
    """``sample_scene(random.Random(seed), simple)``: the scene of :func:`make_example` ``(seed)``."""
    return sample_scene(random.Random(seed), simple)


def _jitter(rng: random.Random | None) -> tuple[float, float]:
    if rng is None:
        return 0.0, 0.0
    return rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, h: float, fill, background) -> None:
    """One shape whose area centroid is at pixel ``(x, y)``, box side ``round(2h)`` pixels, exact flat colours."""
    side = max(1, round(2 * h))
    x0 = round(x - side / 2)
    x1 = x0 + side - 1  # PIL boxes are inclusive
    if shape == "triangle":
        y0 = round(y - 2 * side / 3)  # area centroid sits 2/3 of the height below the apex
        draw.polygon([((x0 + x1) / 2, y0), (x0, y0 + side - 1), (x1, y0 + side - 1)], fill=fill)
        return
    y0 = round(y - side / 2)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y0 + side - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y0 + side - 1], fill=fill)
    else:  # stripes: odd number of bands, shape colour first and last
        edges = [y0 + round(k * side / STRIPE_BANDS) for k in range(STRIPE_BANDS + 1)]
        for k in range(STRIPE_BANDS):
            if edges[k + 1] > edges[k]:
                band = fill if k % 2 == 0 else background
                draw.rectangle([x0, edges[k], x1, edges[k + 1] - 1], fill=band)


def _draw_group(image: Image.Image, scene: Scene, centre: tuple[float, float], colour: str, offsets=None) -> None:
    """Draw the scene's group with its centroid at ``centre`` (fractions of the side) in ``colour``."""
    side = image.width
    draw = ImageDraw.Draw(image)
    offsets = offsets or layout(scene.count, scene.position, scene.size)
    for dx, dy in offsets:
        x, y = (centre[0] + dx) * side, (centre[1] + dy) * side
        h = SIZES[scene.size] * side
        _draw_shape(draw, scene.shape, x, y, h, PALETTE[colour], PALETTE[scene.background])


def render(scene: Scene, size: int = 256, rng: random.Random | None = None) -> Image.Image:
    """RGB image ``[size, size]`` of the scene. ``rng`` draws the group's jitter (``None``: exactly on target)."""
    image = Image.new("RGB", (size, size), PALETTE[scene.background])
    dx, dy = _jitter(rng)
    tx, ty = TARGETS[scene.position]
    _draw_group(image, scene, (tx + dx, ty + dy), scene.colour)
    return image


def make_example(seed: int, size: int = 256, simple: bool | None = None) -> tuple[Image.Image, str, Scene]:
    """(image, caption, scene) for one seed; the scene equals :func:`scene_from_seed` ``(seed, simple)``."""
    rng = random.Random(seed)
    scene = sample_scene(rng, simple)
    return render(scene, size, rng), scene.caption(), scene


def default_second_colour(scene: Scene) -> str:
    """Colour a ``recolour`` clip switches to when none is given: the first palette colour that is neither."""
    return next(c for c in COLOURS if c not in (scene.background, scene.colour))


def check_clip(scene: Scene, motion: str, second_colour: str | None = None) -> str | None:
    """Validate a clip's settings; returns the resolved second colour (``recolour``) or ``None`` (``move``)."""
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r} is not one of {MOTIONS}")
    if motion == "move":
        if scene.position not in OPPOSITE:
            raise ValueError("a 'move' clip starts at its scene's position: left, right, top or bottom, not center")
        return None
    second = second_colour or default_second_colour(scene)
    if second not in PALETTE or second in (scene.background, scene.colour):
        raise ValueError(f"second colour {second!r} must be a palette colour other than the scene's two")
    return second


def clip_path(scene: Scene, frames: int, seed: int = 0) -> list[tuple[float, float]]:
    """Group centroid per frame of a ``move`` clip: linear from the scene's position to the opposite one.

    The first and last frames sit exactly on the two targets along the motion axis; the other axis has one jitter.
    """
    check_clip(scene, "move", None)
    start, end = TARGETS[scene.position], TARGETS[OPPOSITE[scene.position]]
    jx, jy = _jitter(random.Random(seed))
    jx, jy = (0.0, jy) if start[0] != end[0] else (jx, 0.0)
    steps = max(frames - 1, 1)
    return [
        (start[0] + (end[0] - start[0]) * i / steps + jx, start[1] + (end[1] - start[1]) * i / steps + jy)
        for i in range(frames)
    ]


def render_clip(
    scene: Scene, frames: int, size: int = 256, motion: str = "move", seed: int = 0, second_colour: str | None = None
) -> list[Image.Image]:
    """``frames`` RGB images ``[size, size]``.

    ``move``: the group slides linearly from ``scene.position`` to the opposite side (see :func:`clip_path`), keeping
    its layout. ``recolour``: the group stays (one jitter from ``seed``) and its colour switches from ``scene.colour``
    to ``second_colour`` (default :func:`default_second_colour`) at frame ``frames // 2``.
    """
    second = check_clip(scene, motion, second_colour)
    if motion == "move":
        centres, colours = clip_path(scene, frames, seed), [scene.colour] * frames
    else:
        jx, jy = _jitter(random.Random(seed))
        tx, ty = TARGETS[scene.position]
        centres = [(tx + jx, ty + jy)] * frames
        colours = [scene.colour if i < frames // 2 else second for i in range(frames)]
    offsets = layout(scene.count, scene.position, scene.size)
    out = []
    for centre, colour in zip(centres, colours, strict=True):
        image = Image.new("RGB", (size, size), PALETTE[scene.background])
        _draw_group(image, scene, centre, colour, offsets)
        out.append(image)
    return out


def clip_caption(scene: Scene, motion: str, second_colour: str | None = None, style: str = "auto") -> str:
    """Caption of :func:`render_clip` ``(scene, ..., motion, second_colour=...)``.

    "a red circle moving from left to right on a black background", "two small red squares turning blue on the
    left of a black background". ``auto`` leaves out one/large when the group is a single large shape.
    """
    second = check_clip(scene, motion, second_colour)
    minimal = _is_minimal(style, scene.count == 1 and scene.size == "large")
    bg = f"{_article(scene.background)} {scene.background} background"
    if motion == "move":
        return f"{_subject(scene, minimal)} moving from {scene.position} to {OPPOSITE[scene.position]} on {bg}"
    location = "on" if minimal and scene.position == "center" else LOCATIONS[scene.position]
    return f"{_subject(scene, minimal)} turning {second} {location} {bg}"


@dataclass(frozen=True)
class Clip:
    """A video example: a scene, its motion and (``recolour``) the colour the group turns."""

    scene: Scene
    motion: str
    second_colour: str | None = None

    @property
    def target(self) -> str:
        """Where a ``move`` clip ends, or the colour a ``recolour`` clip turns."""
        return OPPOSITE[self.scene.position] if self.motion == "move" else self.second_colour

    def caption(self, style: str = "auto") -> str:
        return clip_caption(self.scene, self.motion, self.second_colour, style)


def sample_clip(rng: random.Random, simple: bool | None = None) -> Clip:
    """A random clip: a :func:`sample_scene` scene; ``move`` half the time when its position allows, else
    ``recolour`` to a uniformly chosen third colour."""
    scene = sample_scene(rng, simple)
    if scene.position in OPPOSITE and rng.random() < 0.5:
        return Clip(scene, "move")
    return Clip(scene, "recolour", rng.choice([c for c in COLOURS if c not in (scene.background, scene.colour)]))


def make_clip_example(
    seed: int, frames: int, size: int = 256, simple: bool | None = None
) -> tuple[list[Image.Image], str, Clip]:
    """(frames, caption, clip) of one seeded video example."""
    rng = random.Random(seed)
    clip = sample_clip(rng, simple)
    video = render_clip(clip.scene, frames, size, clip.motion, rng.randrange(1 << 30), clip.second_colour)
    return video, clip.caption(), clip
