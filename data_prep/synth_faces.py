"""The synthetic face renderer: identities, per-image variation, graded degradations, JPEG.

Faces are drawn procedurally (PIL polygons at 2x then box-downsampled):
- identity traits: face shape, skin/hair/eye/lip colours, hair style, eye spacing
  and size, brow, nose and mouth geometry, beard, glasses, a mole;
- per-image variation: a pose-like affine (rotation, scale, shift, yaw squash),
  expression (smile, open mouth, brow raise, eye openness), directional lighting,
  background and clothing;
- a degradation with a known strength s in [0, 1] (or none): blur, low resolution,
  noise, occlusion, darkening, JPEG compression.

Pure functions of a numpy Generator and their arguments; `data_prep.synth` writes what they draw
in InsightFace's formats.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEGRADATIONS = ("blur", "lowres", "noise", "occlusion", "dark", "compression")
NO_DEGRADATION = "none"
STORAGE_JPEG_QUALITY = 92
_SUPERSAMPLE = 2
FACE_SCALE = 1.25  # the face fills an aligned 112×112 crop as in InsightFace's training sets


@dataclass(frozen=True)
class Traits:
    """What makes an identity recognisable (lengths in units of the image size)."""

    face_w: float
    face_h: float
    chin: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int  # 0 short, 1 long, 2 bald, 3 fringe
    hairline: float
    eye: tuple[int, int, int]
    eye_spacing: float
    eye_y: float
    eye_size: float
    eye_aspect: float
    brow_thickness: float
    brow_tilt: float
    nose_length: float
    nose_width: float
    mouth_y: float
    mouth_w: float
    lip: tuple[int, int, int]
    beard: bool
    glasses: bool
    mole: tuple[float, float] | None


@dataclass(frozen=True)
class Variation:
    """One photograph of an identity: pose, expression, light, surroundings."""

    angle: float
    scale: float
    shift_x: float
    shift_y: float
    yaw: float  # -1..1: squashes the face and slides features sideways
    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float
    light_angle: float
    light_strength: float
    brightness: float
    white_balance: tuple[float, float, float]  # per-channel gains of the camera
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    clothing: tuple[int, int, int]


def _colour(
    rng: np.random.Generator, low: tuple[int, int, int], high: tuple[int, int, int]
) -> tuple[int, int, int]:
    t = rng.random()
    jitter = rng.integers(-12, 13, size=3)
    return tuple(int(np.clip(lo + t * (hi - lo) + j, 0, 255)) for lo, hi, j in zip(low, high, jitter))


def draw_traits(rng: np.random.Generator) -> Traits:
    """A random identity."""
    hair_palette = [
        (20, 15, 10),
        (70, 45, 25),
        (130, 90, 50),
        (200, 170, 110),
        (150, 60, 30),
        (120, 120, 125),
    ]
    eye_palette = [(60, 40, 20), (40, 90, 160), (60, 130, 70), (110, 80, 40), (90, 100, 110)]
    hair = hair_palette[rng.integers(len(hair_palette))]
    return Traits(
        face_w=rng.uniform(0.22, 0.31),
        face_h=rng.uniform(0.29, 0.37),
        chin=rng.uniform(0.0, 0.08),
        skin=_colour(rng, (90, 60, 40), (245, 210, 180)),
        hair=tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in hair),
        hair_style=int(rng.integers(4)),
        hairline=rng.uniform(0.35, 0.65),
        eye=eye_palette[rng.integers(len(eye_palette))],
        eye_spacing=rng.uniform(0.085, 0.13),
        eye_y=rng.uniform(-0.09, -0.02),
        eye_size=rng.uniform(0.035, 0.055),
        eye_aspect=rng.uniform(0.45, 0.75),
        brow_thickness=rng.uniform(0.008, 0.028),
        brow_tilt=rng.uniform(-0.25, 0.25),
        nose_length=rng.uniform(0.07, 0.14),
        nose_width=rng.uniform(0.025, 0.055),
        mouth_y=rng.uniform(0.13, 0.2),
        mouth_w=rng.uniform(0.06, 0.12),
        lip=_colour(rng, (120, 40, 40), (200, 100, 100)),
        beard=bool(rng.random() < 0.25),
        glasses=bool(rng.random() < 0.2),
        mole=(rng.uniform(-0.15, 0.15), rng.uniform(-0.05, 0.2)) if rng.random() < 0.5 else None,
    )


def draw_variation(rng: np.random.Generator, *, amount: float = 1.0) -> Variation:
    """A random photograph setting; `amount` scales how far it strays from a frontal, neutral shot."""

    def around(center: float, spread: float) -> float:
        return center + amount * rng.uniform(-spread, spread)

    return Variation(
        angle=around(0.0, 2.0),
        scale=around(1.0, 0.04),
        shift_x=around(0.0, 0.01),
        shift_y=around(0.0, 0.01),
        yaw=around(0.0, 0.35),
        smile=around(0.1, 0.9),
        mouth_open=max(0.0, around(0.0, 0.8)),
        brow_raise=around(0.0, 0.8),
        eye_open=float(np.clip(around(0.9, 0.5), 0.15, 1.0)),
        light_angle=rng.uniform(0, 2 * math.pi),
        light_strength=abs(around(0.0, 0.45)),
        brightness=around(1.0, 0.15),
        white_balance=(around(1.0, 0.05), around(1.0, 0.05), around(1.0, 0.05)),
        background=(_colour(rng, (30, 30, 30), (230, 230, 230)), _colour(rng, (30, 30, 30), (230, 230, 230))),
        clothing=_colour(rng, (20, 20, 20), (230, 230, 230)),
    )


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, n: int = 28, start: float = 0.0, stop: float = 2 * math.pi
) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


class _Canvas:
    """Draws polygons given in face coordinates through the pose's affine transform."""

    def __init__(self, size: int, traits: Traits, var: Variation):
        self.px = size * _SUPERSAMPLE
        self.image = Image.new("RGB", (self.px, self.px))
        self.draw = ImageDraw.Draw(self.image)
        cos, sin = math.cos(math.radians(var.angle)), math.sin(math.radians(var.angle))
        squash = 1.0 - 0.18 * abs(var.yaw)
        linear = (
            np.array([[cos, -sin], [sin, cos]]) @ np.diag([squash, 1.0]) * var.scale * FACE_SCALE * self.px
        )
        self.matrix = linear
        self.offset = np.array([0.5 + var.shift_x, 0.5 + var.shift_y]) * self.px
        self.feature_shift = 0.06 * var.yaw  # features slide towards the turned side

    def polygon(self, points: np.ndarray, fill: tuple[int, int, int], *, feature: bool = False) -> None:
        if feature:
            points = points + np.array([self.feature_shift, 0.0])
        xy = points @ self.matrix.T + self.offset
        self.draw.polygon([tuple(p) for p in xy.tolist()], fill=fill)

    def line(
        self, points: np.ndarray, fill: tuple[int, int, int], width: float, *, feature: bool = True
    ) -> None:
        if feature:
            points = points + np.array([self.feature_shift, 0.0])
        xy = points @ self.matrix.T + self.offset
        self.draw.line([tuple(p) for p in xy.tolist()], fill=fill, width=max(1, round(width * self.px)))


def _darker(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(c * factor) for c in colour)


def render_face(traits: Traits, var: Variation, size: int = 112) -> np.ndarray:
    """Draw one face photograph: (size, size, 3) uint8 RGB, before any degradation."""
    canvas = _Canvas(size, traits, var)
    px = canvas.px
    # background: a vertical gradient between two colours
    ramp = np.linspace(0.0, 1.0, px, dtype=np.float32)[:, None, None]
    top, bottom = (np.array(c, dtype=np.float32) for c in var.background)
    background = np.broadcast_to(top + ramp * (bottom - top), (px, px, 3)).astype(np.uint8)
    canvas.image.paste(Image.fromarray(background))
    t = traits
    # shoulders and neck
    canvas.polygon(np.array([[-0.5, 0.62], [-0.32, 0.42], [0.32, 0.42], [0.5, 0.62]]), var.clothing)
    canvas.polygon(np.array([[-0.09, 0.2], [0.09, 0.2], [0.11, 0.46], [-0.11, 0.46]]), _darker(t.skin, 0.85))
    if t.hair_style == 1:  # long hair behind the face
        canvas.polygon(_ellipse(0, 0.02, t.face_w * 1.3, t.face_h * 1.15), t.hair)
    # ears, face (ellipse with a pointed chin)
    for side in (-1, 1):
        canvas.polygon(_ellipse(side * t.face_w * 0.98, -0.01, 0.035, 0.06, n=12), _darker(t.skin, 0.9))
    face = _ellipse(0, 0, t.face_w, t.face_h, n=36)
    face[:, 1] += t.chin * np.clip(face[:, 1] / t.face_h, 0, 1) ** 4
    canvas.polygon(face, t.skin)
    # hair on top
    if t.hair_style != 2:
        cap = _ellipse(
            0, -t.face_h * 0.18, t.face_w * 1.08, t.face_h * 0.92, n=24, start=math.pi, stop=2 * math.pi
        )
        line_y = -t.face_h * (t.hairline - (0.15 if t.hair_style == 3 else 0.0))
        hairline = _ellipse(0, line_y, t.face_w * 1.02, t.face_h * 0.12, n=12, start=0, stop=math.pi)
        canvas.polygon(np.concatenate([cap, hairline]), t.hair)
    if t.beard:
        beard = _ellipse(0, 0, t.face_w * 0.98, t.face_h, n=20, start=0.1, stop=math.pi - 0.1)
        beard[:, 1] += t.chin * np.clip(beard[:, 1] / t.face_h, 0, 1) ** 4
        inner = _ellipse(0, t.mouth_y - 0.01, t.mouth_w * 1.3, 0.05, n=12, start=math.pi, stop=0)
        canvas.polygon(np.concatenate([beard, inner]), _darker(t.hair, 0.9), feature=True)
    # eyes, irises, pupils, brows
    eye_ry = t.eye_size * t.eye_aspect * var.eye_open
    for side in (-1, 1):
        cx = side * t.eye_spacing
        canvas.polygon(
            _ellipse(cx, t.eye_y, t.eye_size, max(eye_ry, 0.004), n=16), (240, 240, 235), feature=True
        )
        if var.eye_open > 0.3:
            iris_r = min(t.eye_size * 0.55, eye_ry)
            canvas.polygon(_ellipse(cx, t.eye_y, iris_r, iris_r, n=12), t.eye, feature=True)
            canvas.polygon(
                _ellipse(cx, t.eye_y, iris_r * 0.45, iris_r * 0.45, n=8), (10, 10, 10), feature=True
            )
        brow_y = t.eye_y - t.eye_size * 0.9 - 0.02 * var.brow_raise
        inner_x, outer_x = cx - side * t.eye_size * 0.9, cx + side * t.eye_size * 1.1
        tilt = t.brow_tilt * t.eye_size
        canvas.line(
            np.array([[inner_x, brow_y + tilt], [outer_x, brow_y - tilt]]),
            _darker(t.hair, 0.8),
            t.brow_thickness,
        )
        if t.glasses:
            ring = _ellipse(cx, t.eye_y, t.eye_size * 1.5, t.eye_size * 1.2, n=16)
            canvas.line(ring, (30, 30, 30), 0.01)
    if t.glasses:
        canvas.line(
            np.array(
                [[-t.eye_spacing + t.eye_size * 1.5, t.eye_y], [t.eye_spacing - t.eye_size * 1.5, t.eye_y]]
            ),
            (30, 30, 30),
            0.01,
        )
    # nose
    nose_top, nose_tip = t.eye_y + 0.02, t.eye_y + 0.02 + t.nose_length
    canvas.polygon(
        np.array([[0, nose_top], [t.nose_width, nose_tip], [-t.nose_width, nose_tip]]),
        _darker(t.skin, 0.8),
        feature=True,
    )
    # mouth: an arc whose curvature is the smile; open mouths show a dark inside
    mouth = np.linspace(-t.mouth_w, t.mouth_w, 9)
    curve = t.mouth_y - var.smile * 0.03 * (1 - (mouth / t.mouth_w) ** 2) * -1
    upper = np.stack([mouth, curve - 0.006], axis=1)
    lower = np.stack(
        [mouth[::-1], curve[::-1] + 0.008 + 0.04 * var.mouth_open * (1 - (mouth[::-1] / t.mouth_w) ** 2)],
        axis=1,
    )
    canvas.polygon(np.concatenate([upper, lower]), t.lip, feature=True)
    if var.mouth_open > 0.25:
        inside = np.concatenate([upper + np.array([0, 0.01]), lower - np.array([0, 0.006])])
        canvas.polygon(inside, (50, 15, 20), feature=True)
    if t.mole is not None:
        canvas.polygon(_ellipse(t.mole[0], t.mole[1], 0.01, 0.01, n=8), _darker(t.skin, 0.45), feature=True)
    image = canvas.image.reduce(_SUPERSAMPLE)
    # directional light and overall brightness
    pixels = np.asarray(image, dtype=np.float32)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    light = (
        np.cos(var.light_angle) * axis[None, :, None] + np.sin(var.light_angle) * axis[:, None, None]
    ) * var.light_strength
    pixels *= var.brightness * (1.0 + light) * np.asarray(var.white_balance, dtype=np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- quality


# Strength → the physical level of each degradation, piecewise linear through these points at
# strength 0, 0.25, 0.5, 0.75, 1. Calibrated so that the failures of a mixed set concentrate in
# its most degraded pairs: the share of mated pairs (one clean image, one degraded) that the
# recipe's iresnet_tiny (configs/tiny_cpu.yaml) fails at FMR 1e-2 stays near the clean rate
# (1-2 %) up to strength 0.35 for every kind, is 5-14 % at 0.5, 16-51 % at 0.75, 51-89 % at 0.9
# and 90-98 % at 1 (dark is the mildest at 0.75-0.9, blur and lowres the harshest; measured on
# 300 fresh identities). experiments/efficacy.py measures the effect on the EDC.
DEGRADATION_LEVELS: dict[str, tuple[float, ...]] = {
    "blur": (0.0, 5.5, 7.0, 11.5, 24.0),  # Gaussian radius in pixels
    "lowres": (112.0, 13.0, 9.7, 6.2, 3.0),  # side in pixels it is shrunk to and blown up from
    "noise": (0.0, 35.0, 63.0, 145.0, 330.0),  # σ of Gaussian pixel noise
    "occlusion": (0.0, 0.015, 0.05, 0.17, 0.6),  # area of the occluder, fraction of the image
    "dark": (0.0, 0.15, 0.45, 0.9, 1.25),  # less light: steeper gamma, lower gain, more sensor noise
    "compression": (0.0, 0.3, 0.48, 0.66, 1.0),  # shrunk and stored as a low-quality JPEG (see below)
}
_LEVEL_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def degradation_level(kind: str, strength: float) -> float:
    """The physical level of `kind` at `strength` in [0, 1] (`DEGRADATION_LEVELS`)."""
    if kind not in DEGRADATION_LEVELS:
        raise ValueError(f"unknown degradation {kind!r}; known: {DEGRADATIONS}")
    return float(np.interp(float(np.clip(strength, 0.0, 1.0)), _LEVEL_STRENGTHS, DEGRADATION_LEVELS[kind]))


def degrade_at_level(
    pixels: np.ndarray, kind: str, level: float, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Apply `kind` at a physical `level` (units in `DEGRADATION_LEVELS`); returns (pixels, JPEG quality)."""
    size = pixels.shape[0]
    quality = STORAGE_JPEG_QUALITY
    image = Image.fromarray(pixels)
    if kind == "blur":
        image = image.filter(ImageFilter.GaussianBlur(radius=level))
    elif kind == "lowres":
        side = max(2, round(level))
        image = image.resize((side, side), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    elif kind == "noise":
        noisy = pixels.astype(np.float32) + rng.normal(0.0, level, pixels.shape).astype(np.float32)
        return np.clip(noisy, 0, 255).astype(np.uint8), quality
    elif kind == "occlusion":
        area = level * size * size
        aspect = rng.uniform(0.5, 2.5)
        w, h = min(size, math.sqrt(area * aspect)), min(size, math.sqrt(area / aspect))
        cx, cy = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        ImageDraw.Draw(image).rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=colour)
    elif kind == "dark":
        # less light: a steeper gamma, a lower gain and relatively more sensor noise
        d = min(max(level, 0.0), 1.3)
        dark = (pixels.astype(np.float32) / 255.0) ** (1.0 + 1.5 * d) * max(1.0 - 0.75 * d, 0.02) * 255.0
        dark += rng.normal(0.0, 1.0 + 4.0 * d, pixels.shape).astype(np.float32)
        return np.clip(dark, 0, 255).astype(np.uint8), quality
    elif kind == "compression":
        # a small, heavily compressed copy blown up again (a thumbnail, a low-bitrate video frame):
        # level c shrinks the side by 1 − 0.75c and stores it at JPEG quality 50(1 − c)²
        side = max(8, round(size * (1.0 - 0.75 * level)))
        small = io.BytesIO()
        image.resize((side, side), Image.BILINEAR).save(
            small, format="JPEG", quality=max(1, round(50 * (1.0 - level) ** 2))
        )
        with Image.open(small) as stored:
            image = stored.convert("RGB").resize((size, size), Image.BILINEAR)
    else:
        raise ValueError(f"unknown degradation {kind!r}; known: {DEGRADATIONS}")
    return np.asarray(image), quality


def degrade(
    pixels: np.ndarray, kind: str, strength: float, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Apply one degradation of `strength` in [0, 1]; returns (pixels, JPEG quality to store them at)."""
    s = float(np.clip(strength, 0.0, 1.0))
    if kind == NO_DEGRADATION or s == 0.0:
        return pixels, STORAGE_JPEG_QUALITY
    return degrade_at_level(pixels, kind, degradation_level(kind, s), rng)


def encode_jpeg(pixels: np.ndarray, quality: int = STORAGE_JPEG_QUALITY) -> bytes:
    """Baseline JPEG bytes of an RGB image (deterministic for a given libjpeg)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
