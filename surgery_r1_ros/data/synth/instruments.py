"""The eight EndoVis instruments and their state cues, drawn with cv2 primitives.

Every design follows :data:`surgery_r1_ros.data.cues.INSTRUMENT_LOOKS` and every state cue follows
:data:`surgery_r1_ros.data.cues.STATE_CUES`, so the chain of thought written from those tables
always names something that is in the picture. Sizes are in units of the shaft width ``w`` (about
80 px at 1280x1024), large enough to read at the ~280x224 a small model sees:

==========================  ==========================================================================
instrument                  look
==========================  ==========================================================================
bipolar_forceps             dark shaft, blue band, slim paired jaws with rounded tips
prograsp_forceps            dark shaft, yellow band, broad jaws with a window in each blade
large_needle_driver         dark shaft, green band, short thick blunt jaws with serrations
monopolar_curved_scissors   dark shaft, orange band, two bright curved pointed blades
ultrasound_probe            thick white cylinder, flat paddle head with a dark face
suction                     thin plain steel tube with an open dark tip and side holes
clip_applier                dark shaft, purple band, long narrow parallel jaws
stapler                     thick grey shaft, long two-part jaw: steel anvil over a teal cartridge
==========================  ==========================================================================

State cues (on top of the jaw opening): Grasping a pinched tissue fold with wrinkles; Retraction a
lifted pale flap over a dark exposed gap; Tissue_Manipulation a dent with radial wrinkles;
Tool_Manipulation a gold object in the jaws; Cutting open blades over a bleeding cut line;
Cauterization a charred spot, a glow and a smoke plume; Suction a shrinking glossy blood pool;
Looping violet thread loops around the jaws; Suturing a curved silver needle trailing violet thread;
Clipping a silver clip across a purple vessel (with an earlier clip on it); Staple a pale stapled
band with rows of staples beside the jaws; Ultrasound_Sensing the flat face pressed into a dark
compressed contact patch; Idle closed jaws, no contact, a shadow cast well away from the tool.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from surgery_r1_ros.data.synth.draw import Pen, bezier, ellipse_points, rotate, rounded_rect

# RGB colours
SHAFT_DARK = (34, 34, 38)
SHAFT_LIGHT = (92, 92, 102)
SHAFT_SPEC = (170, 170, 180)
SHAFT_EDGE = (14, 14, 16)
METAL = (168, 170, 176)
METAL_LIGHT = (236, 238, 242)
METAL_DARK = (70, 72, 78)
THREAD = (150, 60, 215)
GOLD = (226, 186, 64)


@dataclass(frozen=True)
class Design:
    """Proportions of one instrument, in shaft widths."""

    width: float  # shaft width relative to the base width
    jaw_length: float
    max_open_deg: float
    band: tuple[int, int, int] | None
    style: str


DESIGNS: dict[str, Design] = {
    "bipolar_forceps": Design(1.0, 1.45, 26, (40, 95, 230), "slim"),
    "prograsp_forceps": Design(1.0, 1.55, 26, (240, 205, 30), "fenestrated"),
    "large_needle_driver": Design(1.0, 0.95, 20, (40, 200, 80), "heavy"),
    "monopolar_curved_scissors": Design(1.0, 1.45, 24, (255, 125, 20), "curved"),
    "ultrasound_probe": Design(1.12, 1.35, 0, None, "probe"),
    "suction": Design(0.62, 0.0, 0, None, "tube"),
    "clip_applier": Design(0.95, 1.95, 16, (165, 60, 215), "narrow"),
    "stapler": Design(1.3, 2.3, 9, None, "stapler"),
}

# Jaw opening (fraction of the design's maximum) that each state shows.
STATE_OPENING: dict[str, float] = {
    "Idle": 0.0,
    "Grasping": 0.0,
    "Retraction": 0.0,
    "Tissue_Manipulation": 0.2,
    "Tool_Manipulation": 0.0,
    "Cutting": 0.9,
    "Cauterization": 0.08,
    "Suction": 0.0,
    "Looping": 0.0,
    "Suturing": 0.0,
    "Clipping": 0.45,
    "Staple": 0.0,
    "Ultrasound_Sensing": 0.0,
}

# How far the shadow falls from the tool (in shaft widths): far when hovering, close when touching.
CONTACT_STATES = frozenset(
    (
        "Grasping",
        "Retraction",
        "Tissue_Manipulation",
        "Cutting",
        "Cauterization",
        "Suction",
        "Suturing",
        "Clipping",
        "Staple",
        "Ultrasound_Sensing",
    )
)


def shadow_offset(state: str) -> float:
    return 0.15 if state in CONTACT_STATES else 1.1


@dataclass
class Look:
    """Everything needed to draw one instrument in one frame."""

    name: str
    state: str
    width: float  # shaft width in pixels
    opening: float  # 0 closed .. 1 fully open
    phase: int  # frames since the state began
    duration: int  # frames the state lasts
    side: int  # +1 / -1: which side asymmetric cues go to
    jitter: float  # small per-state variation in [-1, 1]
    far: float  # how far (pixels) the shaft runs back from the tip, past the frame border
    blood: tuple[tuple[float, float, float], ...] = ()  # occluding blood blotches (x, y, r) in widths
    screen_up: tuple[float, float] = (0.0, -1.0)  # screen-up direction in local coordinates


# ---------------------------------------------------------------------------------------------
# bodies


def _cylinder(pen: Pen, x0: float, x1: float, w0: float, w1: float, colors, body: bool = True, edge=None):
    """A shaded cylinder from x0 to x1 with half-widths w0/2 -> w1/2; colors = base, light, spec, dark."""
    base, light, spec, dark = colors

    def strip(ya: float, yb: float, color, is_body: bool = False) -> None:
        pts = [(x0, ya * w0 / 2), (x1, ya * w1 / 2), (x1, yb * w1 / 2), (x0, yb * w0 / 2)]
        pen.poly("body", pts, color, body=is_body)

    strip(-1, 1, base, body)
    strip(0.45, 1, dark)
    strip(-0.8, -0.1, light)
    strip(-0.6, -0.38, spec)
    if edge is not None:
        t = max(1.0, 0.035 * (w0 + w1))
        pen.line("body", [(x0, -w0 / 2), (x1, -w1 / 2)], edge, t)
        pen.line("body", [(x0, w0 / 2), (x1, w1 / 2)], edge, t)


def _shaft_and_wrist(pen: Pen, look: Look, design: Design, pivot: float, shaft_colors=None) -> None:
    w = look.width
    colors = shaft_colors or (SHAFT_DARK, SHAFT_LIGHT, SHAFT_SPEC, SHAFT_EDGE)
    wrist_end = pivot + 0.75 * w
    band_end = wrist_end + (0.55 * w if design.band else 0.0)
    _cylinder(pen, band_end, look.far, w, w * 1.3, colors)
    if design.band:
        band = design.band
        lighter = tuple(min(255, int(c * 0.6 + 100)) for c in band)
        darker = tuple(int(c * 0.55) for c in band)
        _cylinder(pen, wrist_end, band_end + 1, w, w, (band, lighter, lighter, darker))
    # the wrist: a metal joint with pulley lines
    _cylinder(pen, pivot - 0.05 * w, wrist_end + 1, 0.82 * w, 0.9 * w, (METAL, METAL_LIGHT, METAL_LIGHT, METAL_DARK))
    for f in (0.3, 0.62):
        x = pivot + f * 0.75 * w
        pen.line("body", [(x, -0.43 * w), (x, 0.43 * w)], SHAFT_EDGE, max(1.0, 0.05 * w))
    pen.circle("body", (pivot + 0.15 * w, 0.0), 0.14 * w, METAL_DARK)


def _jaw_outline(style: str, length: float, w: float) -> np.ndarray:
    """Upper jaw (y <= 0) relative to the pivot, pointing to -x."""
    n = 10
    if style == "slim":
        b0, b1 = 0.3 * w, 0.2 * w
        arc = ellipse_points(-length + b1 / 2, -b1 / 2, b1 / 2, b1 / 2, -90, -270, n)
        return np.concatenate([[(0.15 * length, -b0)], arc, [(0.15 * length, 0.0)]])
    if style in ("fenestrated", "heavy"):
        b = (0.45 if style == "fenestrated" else 0.42) * w
        r = b * (0.5 if style == "fenestrated" else 0.35)
        return rounded_rect(-length, 0.15 * length, -b, 0.0, r, n)
    if style == "curved":
        b0 = 0.27 * w
        t = np.linspace(0, 1, 12)
        top = np.stack([0.15 * length - t * 1.15 * length, -b0 * (1 - t) ** 0.8 - 0.01 * w], axis=1)
        bottom = np.stack([-t[::-1] * length, np.zeros(12)], axis=1)
        return np.concatenate([top, bottom])
    if style == "narrow":
        b = 0.19 * w
        return rounded_rect(-length, 0.1 * length, -b, 0.0, 0.06 * w, n)
    raise ValueError(style)


def _outer_offset(style: str, w: float) -> float:
    """How far from the jaw's inner edge its sheen line runs."""
    return {"slim": 0.12, "fenestrated": 0.36, "heavy": 0.3, "curved": 0.1, "narrow": 0.12}[style] * w


def _jaws(pen: Pen, look: Look, design: Design, pivot: float, gap: float = 0.0) -> None:
    w, length = look.width, design.jaw_length * look.width
    angle = np.radians(design.max_open_deg * look.opening)
    upper = _jaw_outline(design.style, length, w)
    lower = upper * (1, -1)
    jaws, sheen = [], []
    for outline, sign in ((upper, 1), (lower, -1)):
        # a light line along the jaw's outer side (from near the pivot to near the tip)
        xs = np.linspace(0.05 * length, (-0.55 if design.style == "curved" else -0.8) * length, 8)
        edge = np.stack([xs, np.full(8, -sign * _outer_offset(design.style, w))], axis=1)
        for pts_list, pts in ((jaws, outline.copy()), (sheen, edge)):
            if design.style == "curved":  # both blades bend to the same side
                t = np.clip(-pts[:, 0] / length, 0, 1)
                pts[:, 1] -= look.side * 0.42 * w * t**2
            pts[:, 1] += sign * -gap / 2
            pts_list.append((rotate(pts, sign * angle) + np.array([pivot, 0.0]), sign))
    color = (205, 207, 214) if design.style == "curved" else METAL
    for pts, sign in jaws:
        if design.style == "fenestrated":
            window = rounded_rect(-0.8 * length, -0.22 * length, -0.32 * w, -0.13 * w, 0.09 * w, 6) * (1, sign)
            window[:, 1] += sign * -gap / 2
            window = rotate(window, sign * angle) + np.array([pivot, 0.0])
            pen.poly_holes("body", [pts, window], color, body=True)
            pen.line("body", window, METAL_DARK, max(1.0, 0.04 * w), closed=True)
        else:
            pen.poly("body", pts, color, body=True)
        pen.line("body", pts, METAL_DARK, max(1.0, 0.035 * w), closed=True)
        if design.style == "heavy":  # serrations across the jaw
            for f in np.linspace(0.15, 0.85, 5):
                x = -f * length
                seg = np.array([[x, -0.05 * w * sign - sign * gap / 2], [x, -0.36 * w * sign - sign * gap / 2]])
                pen.line("body", rotate(seg, sign * angle) + np.array([pivot, 0.0]), METAL_DARK, max(1.0, 0.05 * w))
    for pts, _ in sheen:
        pen.line("body", pts, METAL_LIGHT, max(1.0, 0.07 * w))


def _draw_forceps_like(pen: Pen, look: Look, design: Design, gap: float) -> float:
    pivot = design.jaw_length * look.width
    _shaft_and_wrist(pen, look, design, pivot)
    _jaws(pen, look, design, pivot, gap)
    return pivot


def _draw_probe(pen: Pen, look: Look) -> None:
    w = look.width
    white = ((222, 222, 214), (246, 246, 242), (255, 255, 255), (150, 150, 146))
    head = 1.35 * w
    _cylinder(pen, head + 0.25 * w, look.far, w, w * 1.3, white, edge=(95, 95, 92))
    _cylinder(
        pen,
        head - 0.05 * w,
        head + 0.3 * w,
        0.78 * w,
        0.78 * w,
        ((60, 62, 70), (110, 112, 120), (150, 150, 160), (30, 30, 34)),
    )
    paddle = rounded_rect(0.0, head, -0.62 * w, 0.62 * w, 0.2 * w, 6)
    pen.poly("body", paddle, (226, 226, 218), body=True)
    pen.poly(
        "body",
        [(0.3 * w, -0.5 * w), (head - 0.2 * w, -0.5 * w), (head - 0.2 * w, -0.2 * w), (0.3 * w, -0.2 * w)],
        (250, 250, 248),
    )
    pen.poly(
        "body",
        [(0.25 * w, 0.3 * w), (head - 0.1 * w, 0.3 * w), (head - 0.1 * w, 0.6 * w), (0.25 * w, 0.6 * w)],
        (170, 170, 164),
    )
    pen.line("body", paddle, (95, 95, 92), max(1.0, 0.04 * w), closed=True)
    # the flat face: a dark grey strip across the front of the head
    pen.poly("body", [(0.0, -0.62 * w), (0.2 * w, -0.62 * w), (0.2 * w, 0.62 * w), (0.0, 0.62 * w)], (70, 76, 88))
    pen.line("body", [(0.2 * w, -0.6 * w), (0.2 * w, 0.6 * w)], (40, 44, 52), max(1.0, 0.04 * w))


def _draw_tube(pen: Pen, look: Look) -> None:
    w = look.width
    steel = ((178, 180, 186), (222, 224, 230), (250, 250, 252), (100, 102, 108))
    _cylinder(pen, 0.0, look.far, w, w * 1.3, steel, edge=(70, 72, 78))
    # the open tip: a dark bore seen at an angle, inside a bright rim
    pen.poly("body", ellipse_points(0.0, 0.0, 0.2 * w, 0.5 * w, n=24), (150, 152, 158), body=True)
    pen.poly("body", ellipse_points(0.0, 0.0, 0.13 * w, 0.38 * w, n=24), (28, 18, 18))
    for x in (1.2 * w, 2.1 * w):  # side holes
        pen.poly("body", ellipse_points(x, 0.05 * w, 0.22 * w, 0.16 * w, n=16), (40, 30, 30))


def _draw_stapler(pen: Pen, look: Look, design: Design) -> float:
    w = look.width
    length = design.jaw_length * w
    pivot = length
    grey = ((66, 68, 74), (120, 122, 130), (175, 176, 184), (26, 26, 30))
    _cylinder(pen, pivot + 0.5 * w, look.far, w, w * 1.3, grey)
    _cylinder(pen, pivot - 0.1 * w, pivot + 0.55 * w, 0.95 * w, w, (METAL, METAL_LIGHT, METAL_LIGHT, METAL_DARK))
    pen.line("body", [(pivot + 0.25 * w, -0.45 * w), (pivot + 0.25 * w, 0.45 * w)], SHAFT_EDGE, max(1.0, 0.05 * w))
    angle = np.radians(design.max_open_deg * look.opening)
    anvil = rounded_rect(-length, 0.05 * length, -0.44 * w, 0.0, 0.12 * w, 6)
    cart = rounded_rect(-length * 0.97, 0.05 * length, 0.0, 0.46 * w, 0.1 * w, 6)
    anvil = rotate(anvil, angle) + np.array([pivot, 0.0])
    cart = rotate(cart, -angle) + np.array([pivot, 0.0])
    pen.poly("body", cart, (36, 150, 172), body=True)
    pen.line(
        "body",
        rotate(np.array([(-0.92 * length, 0.12 * w), (-0.05 * length, 0.12 * w)]), -angle) + np.array([pivot, 0.0]),
        (150, 225, 235),
        max(1.0, 0.07 * w),
    )
    for f in np.linspace(0.1, 0.9, 9):  # staple slots on the cartridge
        c = rotate(np.array([(-f * length, 0.3 * w)]), -angle)[0] + np.array([pivot, 0.0])
        pen.poly(
            "body",
            rounded_rect(c[0] - 0.09 * w, c[0] + 0.09 * w, c[1] - 0.04 * w, c[1] + 0.04 * w, 0.02 * w, 2),
            (18, 70, 84),
        )
    pen.line("body", cart, (14, 60, 72), max(1.0, 0.035 * w), closed=True)
    pen.poly("body", anvil, METAL, body=True)
    pen.line(
        "body",
        rotate(np.array([(-0.95 * length, -0.3 * w), (0.0, -0.3 * w)]), angle) + np.array([pivot, 0.0]),
        METAL_LIGHT,
        max(1.0, 0.08 * w),
    )
    pen.line("body", anvil, METAL_DARK, max(1.0, 0.035 * w), closed=True)
    return pivot


# ---------------------------------------------------------------------------------------------
# state cues (tissue layer: under the instrument; over layer: held objects and thread)


def _wrinkles(pen: Pen, center, r0: float, r1: float, n: int, color, thickness: float, jitter: float) -> None:
    for k in range(n):
        a = 2 * np.pi * (k + 0.3 * jitter) / n
        d = np.array([np.cos(a), np.sin(a)])
        p0, p2 = np.asarray(center) + r0 * d, np.asarray(center) + r1 * d
        p1 = (p0 + p2) / 2 + 0.15 * (r1 - r0) * np.array([-d[1], d[0]])
        pen.line("tissue", bezier(p0, p1, p2, 10), color, thickness)


def _cue_grasping(pen: Pen, look: Look, jaw_len: float) -> None:
    w = look.width
    cx = 0.35 * jaw_len
    # a ridge of tissue pinched up across the jaws, with wrinkles converging on the jaws
    for sign in (-1, 1):
        for k in range(3):
            x = cx + (k - 1) * 0.45 * w
            p0, p2 = (x, sign * 0.5 * w), (x + (k - 1) * 0.5 * w, sign * 2.3 * w)
            pen.line("tissue", bezier(p0, (x + (k - 1) * 0.1 * w, sign * 1.4 * w), p2, 10), (110, 30, 36), 0.08 * w)
    ridge = ellipse_points(cx, 0.0, 0.42 * w, 1.9 * w)
    pen.poly("tissue", ridge + np.array([0.12 * w, 0.0]), (120, 34, 38))
    pen.poly("tissue", ridge, (238, 146, 134))
    pen.poly("tissue", ellipse_points(cx - 0.12 * w, 0.0, 0.13 * w, 1.5 * w), (255, 214, 204))


def _cue_retraction(pen: Pen, look: Look) -> None:
    w, s = look.width, look.side
    # the dark space opened up in front of the lifted sheet
    pen.poly("tissue", ellipse_points(-1.25 * w, s * 1.05 * w, 1.0 * w, 0.95 * w), (58, 8, 14))
    pen.poly("tissue", ellipse_points(-1.15 * w, s * 1.2 * w, 0.6 * w, 0.55 * w), (30, 4, 8))
    # the sheet of tissue, stretched from its attachment (side s) to the jaws
    sheet = np.array(
        [
            (0.35 * w, -0.2 * w * s),
            (-0.3 * w, -0.15 * w * s),
            (-0.7 * w, s * 2.2 * w),
            (1.6 * w, s * 2.25 * w),
            (0.95 * w, 0.25 * w * s),
        ]
    )
    pen.poly("tissue", sheet, (236, 148, 136))
    pen.poly("tissue", np.array([(0.1 * w, 0.0), (-0.45 * w, s * 2.2 * w), (0.3 * w, s * 2.2 * w)]), (250, 180, 168))
    pen.line("tissue", sheet, (150, 50, 55), 0.05 * w, closed=True)
    for f in np.linspace(0.0, 1.0, 4):  # stretch lines from the jaws to the attachment
        pen.line(
            "tissue",
            [(0.05 * w + 0.5 * f * w, 0.1 * w * s), (-0.55 * w + 2.0 * f * w, s * 2.2 * w)],
            (200, 95, 95),
            0.045 * w,
        )


def _cue_dent(pen: Pen, look: Look) -> None:
    w = look.width
    c = (-0.2 * w, 0.0)
    pen.poly("tissue", ellipse_points(c[0], c[1], 1.7 * w, 1.45 * w), (120, 36, 38), alpha=0.6)
    pen.poly("tissue", ellipse_points(c[0], c[1], 1.2 * w, 1.0 * w), (70, 14, 20), alpha=0.75)
    pen.poly("tissue", ellipse_points(c[0] + 0.1 * w, c[1] + 0.1 * w, 0.7 * w, 0.58 * w), (226, 132, 120))
    pen.poly("tissue", ellipse_points(c[0] - 0.5 * w, c[1] - 0.55 * w, 0.55 * w, 0.14 * w), (255, 220, 210), alpha=0.9)
    _wrinkles(pen, c, 1.2 * w, 2.3 * w, 10, (95, 24, 30), 0.09 * w, look.jitter)


def _cue_tool_object(pen: Pen, look: Look, jaw_len: float) -> None:
    w = look.width
    x = 0.3 * jaw_len
    turn = 0.25 * look.jitter

    def place(pts):
        return rotate(np.asarray(pts, np.float64), turn, (x, 0))

    body = place(rounded_rect(x - 0.27 * w, x + 0.27 * w, -1.15 * w, 1.15 * w, 0.14 * w))
    pen.poly("over", body, GOLD)
    pen.line("over", place([(x - 0.1 * w, -1.0 * w), (x - 0.1 * w, 1.0 * w)]), (255, 242, 180), 0.1 * w)
    pen.line("over", body, (100, 70, 15), 0.05 * w, closed=True)
    for y in (-0.85 * w, 0.85 * w):  # the object's end caps
        pen.poly("over", place(ellipse_points(x, y, 0.3 * w, 0.17 * w, n=16)), (140, 110, 36))


def _cue_cut(pen: Pen, look: Look, jaw_len: float) -> None:
    w = look.width
    grow = min(1.0, 0.55 + 0.45 * look.phase / max(1, look.duration))
    x0, x1 = 0.45 * jaw_len, 0.45 * jaw_len - grow * (2.8 * w + 0.6 * jaw_len)
    t = np.linspace(0, 1, 14)
    xs = x0 + (x1 - x0) * t
    half = 0.22 * w * np.sin(np.pi * t) ** 0.7 + 0.03 * w
    wav = 0.1 * w * np.sin(6 * t + look.jitter)
    lens = np.concatenate([np.stack([xs, wav - half], 1), np.stack([xs[::-1], (wav + half)[::-1]], 1)])
    rim = np.concatenate(
        [np.stack([xs, wav - half - 0.09 * w], 1), np.stack([xs[::-1], (wav + half + 0.09 * w)[::-1]], 1)]
    )
    pen.poly("tissue", rim, (205, 28, 34))
    pen.poly("tissue", lens, (80, 0, 8))
    for k in range(3):  # blood drops along the cut
        xk = x0 + (x1 - x0) * (0.25 + 0.25 * k)
        pen.circle("tissue", (xk, (0.35 + 0.1 * k) * w * look.side), 0.09 * w, (180, 10, 20))


def _cue_cautery(pen: Pen, look: Look) -> None:
    w = look.width
    rng = np.random.default_rng(int(1000 * (look.jitter + 2)))
    a = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    r = 0.5 * w * (1 + 0.12 * rng.standard_normal(14).clip(-1.5, 1.5))
    char = np.stack([-0.25 * w + r * np.cos(a), r * np.sin(a)], 1)
    pen.poly("tissue", char * 1.3 + np.array([0.07 * w, 0.0]), (226, 200, 160), alpha=0.75)
    pen.poly("tissue", char, (40, 26, 22))
    pen.poly("over", ellipse_points(-0.1 * w, 0.0, 0.2 * w, 0.2 * w), (255, 250, 210), alpha=0.85)
    # smoke rising in screen-up from the tip: puffs that drift, grow and fade
    up = np.asarray(look.screen_up)
    across = np.array([-up[1], up[0]])
    blobs = []
    for k in range(7):
        age = ((look.phase * 1.0 + k * 5.5) % 38) / 38.0
        pos = np.array([-0.2 * w, 0.0]) + up * (0.3 + 3.6 * age) * w + across * 0.5 * w * np.sin(5 * age + k)
        blobs.append((pos[0], pos[1], (0.45 + 0.75 * age) * w, 0.85 * (1 - age) ** 0.6))
    blobs.append((-0.2 * w + up[0] * 0.35 * w, up[1] * 0.35 * w, 0.55 * w, 0.9))
    pen.blobs("smoke", blobs, (232, 232, 228), 0.3 * w)


def _cue_pool(pen: Pen, look: Look) -> None:
    w = look.width
    shrink = 1.0 - 0.4 * min(1.0, look.phase / max(1, look.duration))
    rng = np.random.default_rng(int(1000 * (look.jitter + 2)))
    a = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    r = 1.7 * w * shrink * (1 + 0.15 * np.sin(3 * a + look.jitter * 3) + 0.06 * rng.standard_normal(20))
    pool = np.stack([-0.6 * w + r * np.cos(a), r * np.sin(a) * 0.8], 1)
    pen.poly("tissue", pool * 1.12 + np.array([0.07 * w, 0.0]), (205, 24, 30))  # fresh bright-red rim
    pen.poly("tissue", pool, (104, 4, 10))
    pen.poly("tissue", pool * 0.55 + np.array([-0.25 * w, 0.1 * w]), (62, 0, 6))
    # glossy reflections on the liquid surface
    pen.poly("tissue", ellipse_points(-1.0 * w, -0.55 * w * shrink, 0.8 * w * shrink, 0.16 * w), (255, 225, 225))
    pen.poly("tissue", ellipse_points(-0.3 * w, 0.65 * w * shrink, 0.4 * w * shrink, 0.08 * w), (240, 170, 170))
    for k in range(4):  # bubbles
        pen.circle("tissue", (-0.3 * w - 0.35 * k * w, (0.3 - 0.2 * k) * w * look.side), 0.07 * w, (230, 150, 150))
    # a streak of blood drawn into the tip
    pen.line("over", [(-0.05 * w, 0.0), (-0.6 * w, 0.05 * w)], (150, 10, 16), 0.22 * w)


def _cue_loops(pen: Pen, look: Look, jaw_len: float) -> None:
    w = look.width
    t = 0.13 * w
    for x in (0.3 * jaw_len, 0.65 * jaw_len):
        loop = rotate(ellipse_points(x, 0.0, 0.26 * w, 0.8 * w, n=30), 0.35 * look.side, (x, 0))
        pen.line("over", loop, THREAD, t, closed=True)
        pen.line("over", loop[8:14], (215, 165, 255), 0.4 * t)
    tail = bezier(
        (0.65 * jaw_len, 0.8 * w * look.side), (-0.8 * w, 2.6 * w * look.side), (-2.6 * w, 1.3 * w * look.side)
    )
    pen.line("over", tail, THREAD, t)
    pen.circle("tissue", tail[-1], 0.15 * w, (90, 20, 30))


def _cue_needle(pen: Pen, look: Look) -> None:
    w = look.width
    s = look.side
    r = 1.0 * w
    held = (0.3 * w, 0.0)  # where the jaws hold the needle
    phi = np.radians(np.linspace(-35, 195, 30))
    arc = np.stack([held[0] - r + r * np.cos(phi), held[1] + s * r * np.sin(phi)], axis=1)
    pen.line("over", arc, (60, 62, 70), 0.22 * w)
    pen.line("over", arc, (230, 232, 240), 0.15 * w)
    pen.line("over", arc[5:20], (255, 255, 255), 0.05 * w)
    pen.circle("tissue", arc[-1], 0.15 * w, (90, 20, 30))
    end = arc[0]
    thread = bezier(end, (end[0] - 0.8 * w, end[1] + 2.8 * w * s), (-3.0 * w, 2.2 * w * s), 30)
    pen.line("over", thread, THREAD, 0.12 * w)


def _cue_clip(pen: Pen, look: Look, jaw_len: float) -> None:
    w = look.width
    x = 0.35 * jaw_len
    vessel = bezier((x - 0.3 * w, -3.2 * w), (x + 0.4 * w * look.jitter, 0.0), (x - 0.2 * w, 3.2 * w), 20)
    pen.line("tissue", vessel, (70, 28, 80), 0.55 * w)
    pen.line("tissue", vessel, (112, 52, 120), 0.38 * w)
    pen.line("tissue", vessel, (160, 110, 170), 0.08 * w)

    def clip(x0: float, y0: float, length: float, spread: float) -> None:
        pts = np.array(
            [(x0 + length, y0 - spread), (x0, y0 - 0.03 * w), (x0, y0 + 0.03 * w), (x0 + length, y0 + spread)]
        )
        pen.line("over", pts, (90, 92, 100), 0.15 * w)
        pen.line("over", pts, (236, 238, 246), 0.09 * w)

    # the clip in the jaws (across the vessel) and an earlier clip already closed on the vessel
    clip(-0.05 * jaw_len, 0.0, 0.5 * jaw_len, 0.12 * w)
    yy = 1.6 * w * look.side
    prev = rotate(np.array([(x - 0.5 * w, yy), (x + 0.5 * w, yy)]), 0.0)
    pen.line("tissue", prev, (90, 92, 100), 0.2 * w)
    pen.line("tissue", prev, (236, 238, 246), 0.12 * w)


def _cue_staples(pen: Pen, look: Look, jaw_len: float) -> None:
    w = look.width
    for sign in (1, -1):
        y = sign * 0.95 * w
        band = rounded_rect(0.02 * jaw_len, 0.95 * jaw_len, y - 0.3 * w, y + 0.3 * w, 0.1 * w)
        pen.poly("tissue", band, (244, 206, 196))
        pen.line("tissue", band, (190, 110, 110), 0.04 * w, closed=True)
        n = max(4, int(jaw_len / (0.32 * w)))
        for k in range(n):
            xk = 0.08 * jaw_len + k * 0.85 * jaw_len / n
            for row, off in ((0, -0.13 * w), (1, 0.13 * w)):
                xs = xk + row * 0.16 * w
                pen.line("tissue", [(xs - 0.12 * w, y + off), (xs + 0.12 * w, y + off)], (80, 82, 90), 0.1 * w)
                pen.line("tissue", [(xs - 0.1 * w, y + off), (xs + 0.1 * w, y + off)], (235, 236, 244), 0.06 * w)


def _cue_ultrasound(pen: Pen, look: Look) -> None:
    w = look.width
    pen.poly("tissue", ellipse_points(-0.1 * w, 0.0, 0.8 * w, 1.35 * w), (120, 36, 40), alpha=0.6)
    pen.poly("tissue", ellipse_points(-0.05 * w, 0.0, 0.45 * w, 1.05 * w), (80, 16, 24), alpha=0.85)
    for k in (1, 2, 3):  # compression ripples in front of the face
        arc = ellipse_points(-0.05 * w, 0.0, (0.5 + 0.38 * k) * w, (1.1 + 0.3 * k) * w, 115, 245, 18)
        pen.line("tissue", arc, (255, 200, 190), 0.08 * w)
    pen.line("over", [(0.0, -0.62 * w), (0.0, 0.62 * w)], (255, 255, 255), 0.07 * w)


def _blood_on_tool(pen: Pen, look: Look) -> None:
    w = look.width
    for x, y, r in look.blood:
        pen.poly("over", ellipse_points(x * w, y * w, r * w * 1.4, r * w), (120, 8, 14), alpha=0.85)


def draw_instrument(look: Look, tip, angle: float) -> Pen:
    """Record one instrument with its state cue; the Pen keeps its layers and its body polygons."""
    if look.name not in DESIGNS:
        raise ValueError(f"unknown instrument {look.name!r}")
    design = DESIGNS[look.name]
    pen = Pen(tip, angle)
    w = look.width
    jaw_len = design.jaw_length * w
    state = look.state
    gap = {"Grasping": 0.3 * w, "Tool_Manipulation": 0.12 * w, "Suturing": 0.06 * w}.get(state, 0.0)
    style = design.style
    if style == "probe":
        _draw_probe(pen, look)
        jaw_len = 0.3 * w
    elif style == "tube":
        _draw_tube(pen, look)
        look = replace(look, width=look.width / design.width)  # cues at the usual scale, not the thin tube's
        jaw_len = 0.3 * look.width
    elif style == "stapler":
        _draw_stapler(pen, look, design)
    else:
        _draw_forceps_like(pen, look, design, gap)

    if state == "Grasping":
        _cue_grasping(pen, look, jaw_len)
    elif state == "Retraction":
        _cue_retraction(pen, look)
    elif state == "Tissue_Manipulation":
        _cue_dent(pen, look)
    elif state == "Tool_Manipulation":
        _cue_tool_object(pen, look, jaw_len)
    elif state == "Cutting":
        _cue_cut(pen, look, jaw_len)
    elif state == "Cauterization":
        _cue_cautery(pen, look)
    elif state == "Suction":
        _cue_pool(pen, look)
    elif state == "Looping":
        _cue_loops(pen, look, jaw_len)
    elif state == "Suturing":
        _cue_needle(pen, look)
    elif state == "Clipping":
        _cue_clip(pen, look, jaw_len)
    elif state == "Staple":
        _cue_staples(pen, look, jaw_len)
    elif state == "Ultrasound_Sensing":
        _cue_ultrasound(pen, look)
    if look.blood:
        _blood_on_tool(pen, look)
    return pen
