"""Simulated endoscope video: instruments that move, change state, enter and leave; the rendered frames.

:func:`render_sequence` is the streaming API (see the package docstring). Everything random comes
from one ``numpy.random.Generator`` seeded by the sequence seed, so a seed always gives the same
frames and truth, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from surgery_r1_ros.boxes import quadrant_of
from surgery_r1_ros.data.cues import INSTRUMENT_STATES
from surgery_r1_ros.data.synth.draw import AA, SHIFT, Pen, soft_blobs, to_fixed
from surgery_r1_ros.data.synth.instruments import DESIGNS, STATE_OPENING, Look, draw_instrument, shadow_offset
from surgery_r1_ros.data.synth.tissue import Background, make_background
from surgery_r1_ros.vocab import INSTRUMENTS, QuestionKind, make_question

DEFAULT_SIZE = (1280, 1024)
DIFFICULTIES = ("easy", "normal", "hard")

PixelBox = tuple[int, int, int, int]
# Dense truth (``FrameTruth.mask``): 0 tissue, 1..8 the instrument of that vocabulary index + 1, ORGAN_LABEL organ.
ORGAN_LABEL = len(INSTRUMENTS) + 1
IDLE_WEIGHT = 0.6  # Idle is picked less often than each working state (tools also idle while entering/leaving)


@dataclass(frozen=True)
class Difficulty:
    """The knobs that make frames harder to read."""

    noise: float  # sensor noise sigma (grey levels)
    blur: float  # Gaussian blur sigma at 1280 px (0 = none)
    motion_blur: float  # chance per frame of a motion-blurred frame
    haze: float  # chance per sequence of a drifting smoke haze
    blood: float  # chance per instrument of blood smeared over it
    gain: tuple[float, float]  # overall brightness range
    flicker: float  # per-frame brightness jitter
    vignette: tuple[float, float]  # corner darkening range


DIFFICULTY: dict[str, Difficulty] = {
    "easy": Difficulty(1.5, 0.0, 0.0, 0.0, 0.0, (0.98, 1.08), 0.01, (0.45, 0.6)),
    "normal": Difficulty(3.0, 0.0, 0.0, 0.3, 0.2, (0.88, 1.04), 0.025, (0.6, 0.78)),
    "hard": Difficulty(6.0, 1.1, 0.15, 0.7, 0.45, (0.68, 0.92), 0.06, (0.75, 0.9)),
}


@dataclass(frozen=True)
class InstrumentTruth:
    """One visible instrument: its state, its box (whole visible instrument, pixels) and quadrant."""

    name: str
    state: str
    box: PixelBox
    quadrant: str
    tip: tuple[float, float] = (0.0, 0.0)  # tip position in pixels (may lie just outside the frame)


@dataclass(frozen=True)
class FrameTruth:
    """What is in one frame, and its EndoVis-18-VQLA label lines."""

    index: int
    size: tuple[int, int]
    organ: str
    organ_box: PixelBox
    instruments: list[InstrumentTruth] = field(default_factory=list)
    # (h, w) uint8: which instrument (vocabulary index + 1) or the organ (ORGAN_LABEL) each pixel shows, 0 tissue.
    # Instruments are painted in depth order, so a tool in front hides the one behind (its label box does not).
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    def qas(self) -> list[tuple[str, str, PixelBox]]:
        """``(question, answer, box)``: the organ question, then state and location per instrument."""
        out = [(make_question(QuestionKind.ORGAN), self.organ, self.organ_box)]
        for inst in self.instruments:
            out.append((make_question(QuestionKind.STATE, inst.name), inst.state, inst.box))
            out.append((make_question(QuestionKind.LOCATION, inst.name), inst.quadrant, inst.box))
        return out

    def qa_lines(self) -> list[str]:
        """The label file's lines: ``question|answer|x1,y1,x2,y2``."""
        return [f"{q}|{a}|{b[0]},{b[1]},{b[2]},{b[3]}" for q, a, b in self.qas()]

    def dense_record(self) -> dict:
        """The dense sidecar's JSON: what each mask value means and every instrument's state, box and tip."""
        return {
            "size": list(self.size),
            "mask_values": {"0": "tissue", str(ORGAN_LABEL): self.organ}
            | {str(i + 1): name for i, name in enumerate(INSTRUMENTS)},
            "organ": self.organ,
            "organ_box": list(self.organ_box),
            "instruments": [
                {"name": t.name, "state": t.state, "box": list(t.box), "quadrant": t.quadrant,
                 "tip": [round(t.tip[0], 2), round(t.tip[1], 2)]}
                for t in self.instruments
            ],
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# geometry


def _clip_extent(pts: np.ndarray, w: float, h: float) -> np.ndarray:
    """Points whose bounding box is that of the polygon's part inside [0, w] x [0, h].

    They are the polygon's vertices inside the frame, its edges' crossings of the frame border and
    the frame corners inside the polygon.
    """
    p, q = pts, np.roll(pts, -1, axis=0)
    inside = (p[:, 0] >= 0) & (p[:, 0] <= w) & (p[:, 1] >= 0) & (p[:, 1] <= h)
    found = [p[inside]]
    d = q - p
    for axis, limit in ((0, 0.0), (0, w), (1, 0.0), (1, h)):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (limit - p[:, axis]) / d[:, axis]
        ok = np.isfinite(t) & (t >= 0) & (t <= 1)
        if ok.any():
            hit = p[ok] + t[ok, None] * d[ok]
            other = 1 - axis
            span = w if other == 0 else h
            found.append(hit[(hit[:, other] >= -1e-6) & (hit[:, other] <= span + 1e-6)])
    contour = pts.astype(np.float32).reshape(-1, 1, 2)
    corners = [c for c in ((0, 0), (w, 0), (0, h), (w, h)) if cv2.pointPolygonTest(contour, c, False) >= 0]
    if corners:
        found.append(np.array(corners, np.float64))
    return np.concatenate(found)


def visible_box(polygons: list[np.ndarray], size: tuple[int, int]) -> PixelBox | None:
    """Whole-pixel box of the polygons' parts inside the frame, or None if nothing is inside."""
    w, h = size
    parts = [c for c in (_clip_extent(p, w, h) for p in polygons) if len(c)]
    if not parts:
        return None
    pts = np.concatenate(parts)
    x1, y1 = np.floor(pts.min(axis=0))
    x2, y2 = np.ceil(pts.max(axis=0))
    return int(max(x1, 0)), int(max(y1, 0)), int(min(x2, w)), int(min(y2, h))


def _exit_distance(p: np.ndarray, u: np.ndarray, w: float, h: float) -> float:
    """Distance from p (inside the frame) along u to the frame border."""
    ts = []
    for k, lim in ((0, w), (1, h)):
        if u[k] > 1e-9:
            ts.append((lim - p[k]) / u[k])
        elif u[k] < -1e-9:
            ts.append(-p[k] / u[k])
    return max(0.0, min(ts)) if ts else 0.0


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


# ---------------------------------------------------------------------------------------------
# simulation


@dataclass
class _Tool:
    name: str
    tip: np.ndarray
    angle: float
    home_angle: float
    state: str = "Idle"
    duration: int = 1
    phase: int = 0
    side: int = 1
    jitter: float = 0.0
    opening: float = 0.0
    mode: str = "work"  # "in" entering, "work", "out" leaving
    target: np.ndarray | None = None  # where an entering tool's tip stops
    goal: np.ndarray | None = None  # where an idle tool is heading
    vel: np.ndarray = field(default_factory=lambda: np.zeros(2))
    omega: float = 0.0
    blood: tuple = ()
    depth: float = 0.0


class _Scene:
    """The state of one simulated sequence; ``step`` advances it by one 30 Hz frame."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int], difficulty: str, continuous: bool) -> None:
        if difficulty not in DIFFICULTY:
            raise ValueError(f"unknown difficulty {difficulty!r}; use one of {', '.join(DIFFICULTIES)}")
        w, h = size
        if w < 64 or h < 64:
            raise ValueError(f"frame size {w}x{h} is too small (at least 64x64)")
        self.rng, self.size, self.continuous = rng, size, continuous
        self.knobs = DIFFICULTY[difficulty]
        self.unit = float(np.sqrt(w * h / (1280 * 1024)))
        self.base_width = 92 * self.unit * rng.uniform(0.9, 1.1)
        self.bg: Background = make_background(rng, size, self.unit, difficulty)
        m = self.bg.margin
        self.cam = np.array([m, m], np.float64) + rng.uniform(-0.5, 0.5, 2) * m
        self.cam_vel = np.zeros(2)
        a = rng.uniform(0, 2 * np.pi)
        self.shadow_dir = np.array([np.cos(a), np.sin(a)])
        self.gain = rng.uniform(*self.knobs.gain)
        self.vignette = _vignette(size, rng.uniform(*self.knobs.vignette), rng)
        # noise = pos - neg with pos, neg uniform on 0..k-1: a triangular distribution, sigma ~ k / 2.45
        pad, k = 64, max(2, round(2.45 * self.knobs.noise))
        self.noise_pos = rng.integers(0, k, (h + pad, w + pad, 3), dtype=np.uint8)
        self.noise_neg = rng.integers(0, k, (h + pad, w + pad, 3), dtype=np.uint8)
        self.haze = None
        if rng.random() < self.knobs.haze:
            c = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h])
            blobs = [
                (*(c + rng.normal(0, 0.08 * w, 2)), rng.uniform(0.08, 0.16) * w, rng.uniform(0.3, 0.5))
                for _ in range(5)
            ]
            self.haze = (np.array(blobs), rng.normal(0, 0.6 * self.unit, 2))
        self.frame_index = 0
        self.tools: list[_Tool] = []
        self._populate()

    # --- placing tools -------------------------------------------------------------------------
    def _count(self) -> int:
        return int(self.rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))

    def _populate(self) -> None:
        names = self.rng.choice(len(INSTRUMENTS), size=self._count(), replace=False)
        self.tools = []
        for k in names:
            tool = self._new_tool(INSTRUMENTS[int(k)])
            self._new_state(tool, first=True)
            self.tools.append(tool)

    def _place(self) -> tuple[np.ndarray, float]:
        """A tip position away from other tips and a shaft direction that leaves enough shaft in view."""
        w, h = self.size
        rng = self.rng
        best = None
        for _ in range(30):
            tip = rng.uniform([0.14 * w, 0.14 * h], [0.86 * w, 0.86 * h])
            clear = min((np.linalg.norm(tip - t.tip) for t in self.tools), default=w)
            angle = rng.uniform(0, 2 * np.pi)
            length = _exit_distance(tip, _unit(angle), w, h)
            score = min(clear / (0.3 * w), 1.0) + min(length / (0.3 * w), 1.0)
            if best is None or score > best[0]:
                best = (score, tip, angle)
            if score >= 2.0:
                break
        return best[1], best[2]

    def _new_tool(self, name: str) -> _Tool:
        tip, angle = self._place()
        tool = _Tool(name, tip, angle, angle, depth=float(self.rng.random()))
        if self.rng.random() < self.knobs.blood:
            tool.blood = tuple(
                (self.rng.uniform(2.5, 5.0), self.rng.uniform(-0.35, 0.35), self.rng.uniform(0.12, 0.25))
                for _ in range(self.rng.integers(1, 4))
            )
        return tool

    def _new_state(self, tool: _Tool, first: bool = False) -> None:
        allowed = INSTRUMENT_STATES[tool.name]
        # a new state differs from the last, except for tools with few states (not always back to Idle)
        choices = [s for s in allowed if s != tool.state or first or len(allowed) <= 3]
        weights = np.array([IDLE_WEIGHT if s == "Idle" else 1.0 for s in choices])
        tool.state = str(self.rng.choice(choices, p=weights / weights.sum()))
        tool.duration = int(self.rng.integers(18, 64))
        tool.phase = 0
        tool.side = int(self.rng.choice([-1, 1]))
        tool.jitter = float(self.rng.uniform(-1, 1))
        if first or not self.continuous:
            tool.phase = int(self.rng.integers(0, tool.duration))
            tool.opening = STATE_OPENING[tool.state]
        elif tool.state == "Idle":  # between tasks a tool moves to a new place
            w, h = self.size
            tool.goal = self.rng.uniform([0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
            tool.home_angle = tool.angle + float(self.rng.normal(0, 0.35))

    # --- moving ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Advance one frame (continuous video) or lay out a new independent scene."""
        self.frame_index += 1
        if not self.continuous:
            m = self.bg.margin
            self.cam = self.rng.uniform(0, 2 * m, 2)
            self._populate()
            return
        rng, (w, h), unit = self.rng, self.size, self.unit
        m = self.bg.margin
        self.cam_vel = 0.92 * self.cam_vel + rng.normal(0, 0.08 * unit, 2)
        self.cam_vel += 0.004 * (m - self.cam)
        self.cam = np.clip(self.cam + self.cam_vel, 0, 2 * m)
        if self.haze is not None:
            blobs, drift = self.haze
            blobs[:, :2] += drift
            blobs[:, :2] = np.clip(blobs[:, :2], [0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h])

        for tool in list(self.tools):
            self._move(tool)
        # tools come and go now and then (one at a time)
        if all(t.mode == "work" for t in self.tools) and rng.random() < 1 / 90:
            if len(self.tools) > 1 and (len(self.tools) == 3 or rng.random() < 0.5):
                tool = self.tools[int(rng.integers(len(self.tools)))]
                tool.mode, tool.state, tool.phase, tool.duration = "out", "Idle", 0, 10**6
            else:
                present = {t.name for t in self.tools}
                name = str(rng.choice([n for n in INSTRUMENTS if n not in present]))
                tool = self._new_tool(name)
                tool.target = tool.tip.copy()
                u = _unit(tool.angle)
                tool.tip = tool.tip + u * (_exit_distance(tool.tip, u, w, h) + 0.05 * w)
                tool.mode, tool.state, tool.duration = "in", "Idle", 10**6
                self.tools.append(tool)

    def _move(self, tool: _Tool) -> None:
        rng, (w, h), unit = self.rng, self.size, self.unit
        u = _unit(tool.angle)
        if tool.mode == "in":
            gap = tool.target - tool.tip
            dist = float(np.linalg.norm(gap))
            tool.tip = tool.tip + gap * min(1.0, 0.045 * w / max(dist, 1e-6), 0.25) if dist > 0.004 * w else tool.target
            if dist <= 0.004 * w:
                tool.mode = "work"
                tool.state = "Idle"
                self._new_state(tool)
            return
        if tool.mode == "out":
            tool.tip = tool.tip + u * 0.035 * w
            if not (-0.05 * w <= tool.tip[0] <= 1.05 * w and -0.05 * h <= tool.tip[1] <= 1.05 * h):
                self.tools.remove(tool)
            return
        tool.phase += 1
        if tool.phase >= tool.duration:
            self._new_state(tool)
        target_open = STATE_OPENING[tool.state]
        if tool.state == "Cutting":
            target_open = 0.7 + 0.3 * np.sin(tool.phase * 0.45)
        tool.opening += (target_open - tool.opening) * 0.35
        calm = 0.5 if tool.state != "Idle" else 1.0
        tool.vel = 0.9 * tool.vel + rng.normal(0, 0.9 * unit, 2)
        if tool.goal is not None:
            gap = tool.goal - tool.tip
            dist = float(np.linalg.norm(gap))
            if dist < 0.02 * w or tool.state != "Idle":
                tool.goal = None
            else:  # glide towards it, at most ~0.012 of the width per frame
                tool.vel = 0.85 * tool.vel + 0.15 * gap * min(0.08, 0.012 * w / dist)
        lo, hi = np.array([0.12 * w, 0.12 * h]), np.array([0.88 * w, 0.88 * h])
        tool.vel += np.where(tool.tip < lo, 0.4 * unit, 0.0) - np.where(tool.tip > hi, 0.4 * unit, 0.0)
        for other in self.tools:
            if other is not tool:
                d = tool.tip - other.tip
                dist = float(np.linalg.norm(d))
                if dist < 0.25 * w:
                    tool.vel += 0.25 * unit * d / max(dist, 1.0)
        tool.tip = tool.tip + calm * tool.vel
        tool.omega = 0.9 * tool.omega + rng.normal(0, 0.0018)
        tool.omega += 0.002 * np.sin(tool.home_angle - tool.angle)
        if _exit_distance(np.clip(tool.tip, 0, [w, h]), u, w, h) < 0.15 * w:
            tool.omega += 0.003 * np.sign(np.sin(tool.home_angle - tool.angle) + 1e-9)
        tool.angle += calm * tool.omega

    # --- drawing --------------------------------------------------------------------------------
    def _look(self, tool: _Tool) -> Look:
        w, h = self.size
        u = _unit(tool.angle)
        v = np.array([-u[1], u[0]])
        up = np.array([0.0, -1.0])
        return Look(
            name=tool.name,
            state=tool.state,
            width=self.base_width * DESIGNS[tool.name].width,
            opening=float(np.clip(tool.opening, 0, 1)),
            phase=tool.phase,
            duration=tool.duration,
            side=tool.side,
            jitter=tool.jitter,
            far=float(np.hypot(w, h) * 1.3),
            blood=tool.blood,
            screen_up=(float(up @ u), float(up @ v)),
        )

    def render(self) -> tuple[np.ndarray, FrameTruth]:
        rng, (w, h), knobs = self.rng, self.size, self.knobs
        offset = (int(np.rint(self.cam[0])), int(np.rint(self.cam[1])))
        frame = self.bg.crop(offset)
        tools = sorted(self.tools, key=lambda t: t.depth)
        pens: list[tuple[_Tool, Pen, Look]] = []
        for tool in tools:
            look = self._look(tool)
            pens.append((tool, draw_instrument(look, tool.tip, tool.angle), look))

        for _, pen, _ in pens:
            pen.render(frame, "tissue")
        self._shadows(frame, pens)
        for _, pen, _ in pens:
            pen.render(frame, "body")
            pen.render(frame, "over")
        for _, pen, _ in pens:
            pen.render(frame, "smoke")
        if self.haze is not None:
            soft_blobs(frame, [tuple(b) for b in self.haze[0]], (214, 208, 204), 0.05 * w)

        gain = self.gain * (1 + rng.normal(0, knobs.flicker))
        cv2.multiply(frame, self.vignette, dst=frame, scale=gain / 200.0)
        pad = self.noise_pos.shape[0] - h
        dx, dy = (int(v) for v in rng.integers(0, pad, 2))
        cv2.add(frame, self.noise_pos[dy : dy + h, dx : dx + w], dst=frame)
        dx, dy = (int(v) for v in rng.integers(0, pad, 2))
        cv2.subtract(frame, self.noise_neg[dy : dy + h, dx : dx + w], dst=frame)
        if knobs.motion_blur and rng.random() < knobs.motion_blur:
            frame = _motion_blur(frame, rng, self.unit)
        if knobs.blur:
            frame = cv2.GaussianBlur(frame, (0, 0), knobs.blur * self.unit)

        truths = []
        for tool, pen, _ in pens:
            box = visible_box(pen.body, self.size)
            if box is None:
                continue
            bw, bh = box[2] - box[0], box[3] - box[1]
            if min(bw, bh) < 0.02 * w or bw * bh < (0.06 * w) ** 2:
                continue  # only a sliver at the border while entering or leaving
            truths.append(
                InstrumentTruth(
                    tool.name, tool.state, box, quadrant_of(box, self.size), (float(tool.tip[0]), float(tool.tip[1]))
                )
            )
        truths.sort(key=lambda t: INSTRUMENTS.index(t.name))
        organ_box = self.bg.organ_box(offset)
        organ_px = (
            (0, 0, w, h)
            if organ_box is None
            else (
                int(np.floor(organ_box[0])),
                int(np.floor(organ_box[1])),
                int(np.ceil(organ_box[2])),
                int(np.ceil(organ_box[3])),
            )
        )
        mask = self._dense_mask(pens, offset)
        return frame, FrameTruth(self.frame_index, self.size, self.bg.organ, organ_px, truths, mask)

    def _dense_mask(self, pens, offset: tuple[int, int]) -> np.ndarray:
        """Per-pixel truth: the organ polygon, then each tool's body polygons in drawing (depth) order."""
        w, h = self.size
        mask = np.zeros((h, w), np.uint8)
        organ = self.bg.organ_polygon - np.asarray(offset, np.float64)
        cv2.fillPoly(mask, [to_fixed(organ)], ORGAN_LABEL, cv2.LINE_8, SHIFT)
        for tool, pen, _ in pens:
            label = INSTRUMENTS.index(tool.name) + 1
            cv2.fillPoly(mask, [to_fixed(p) for p in pen.body], label, cv2.LINE_8, SHIFT)
        return mask

    def _shadows(self, frame: np.ndarray, pens) -> None:
        """Soft shadows under the tools, drawn at quarter resolution: far when hovering, near on contact."""
        w, h = self.size
        q = 4
        sw, sh = max(2, w // q), max(2, h // q)
        mask = np.zeros((sh, sw), np.uint8)
        for _, pen, look in pens:
            off = self.shadow_dir * shadow_offset(look.state) * look.width
            polys = [to_fixed((p + off) * (sw / w, sh / h)) for p in pen.silhouette]
            cv2.fillPoly(mask, polys, 255, AA, SHIFT)
        mask = cv2.GaussianBlur(mask, (0, 0), max(0.6, 0.16 * self.base_width / q))
        factor = 255 - (mask.astype(np.uint16) * 150 // 255).astype(np.uint8)
        factor = cv2.resize(cv2.merge([factor, factor, factor]), (w, h), interpolation=cv2.INTER_LINEAR)
        cv2.multiply(frame, factor, dst=frame, scale=1 / 255.0)


def _vignette(size: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness map x200 (uint8, 3 channels): a bright centre falling off to dark corners."""
    w, h = size
    lw, lh = max(8, w // 8), max(8, h // 8)
    cx, cy = 0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    r = np.sqrt(((xx + 0.5) / lw - cx) ** 2 + ((yy + 0.5) / lh - cy) ** 2) / np.sqrt(0.5)  # 1 at the corners
    t = np.clip((r - 0.3) / 0.75, 0, 1)
    falloff = 1 - strength * (t * t * (3 - 2 * t))
    hot = 1 + 0.12 * np.clip(1 - 2 * r * r, 0, 1)
    vig = np.clip(falloff * hot * 200, 0, 255).astype(np.uint8)
    vig = cv2.resize(vig, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.merge([vig, vig, vig])


def _motion_blur(frame: np.ndarray, rng: np.random.Generator, unit: float) -> np.ndarray:
    k = max(3, int(np.rint(9 * unit)) | 1)
    kernel = np.zeros((k, k), np.float32)
    a = rng.uniform(0, np.pi)
    c = (k - 1) / 2
    cv2.line(
        kernel,
        (int(np.rint(c - c * np.cos(a))), int(np.rint(c - c * np.sin(a)))),
        (int(np.rint(c + c * np.cos(a))), int(np.rint(c + c * np.sin(a)))),
        1.0,
        1,
    )
    kernel /= kernel.sum()
    return cv2.filter2D(frame, -1, kernel)


def render_sequence(
    seed: int,
    n_frames: int,
    size: tuple[int, int] = DEFAULT_SIZE,
    difficulty: str = "normal",
    continuous: bool = True,
    step: int = 1,
) -> Iterator[tuple[np.ndarray, FrameTruth]]:
    """Yield ``n_frames`` of ``(frame, truth)``: frame an RGB uint8 HxWx3 array, truth a FrameTruth.

    ``continuous=True`` is a 30 Hz video: instruments drift smoothly, hold a state for 18-63 frames
    then change, and now and then one leaves or a new one enters. ``step`` > 1 yields every
    ``step``-th video frame (the ones between are simulated, not drawn). ``continuous=False`` lays
    out an independent scene each frame (same tissue). The same arguments always give the same frames.
    """
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    size = (int(size[0]), int(size[1]))
    scene = _Scene(np.random.default_rng(seed), size, difficulty, continuous)
    for k in range(n_frames):
        if k:
            for _ in range(step if continuous else 1):
                scene.step()
        yield scene.render()
