"""Synthetic endoscope scenes with Surgical-VQLA labels, in the EndoVis-18-VQLA layout.

Frames look like a laparoscopic view of a kidney: textured pink/red tissue with vessels, fat and wet
highlights, a dark red bean-shaped kidney, vignetting, and 1 to 3 of the 8 EndoVis instruments,
each drawn with its own design (:data:`surgery_r1_ros.data.cues.INSTRUMENT_LOOKS`) and a visible
cue of its state (:data:`surgery_r1_ros.data.cues.STATE_CUES`, only states allowed by
:data:`~surgery_r1_ros.data.cues.INSTRUMENT_STATES`). A seed always gives byte-identical output.

Dataset API (used by ``surgery-r1 data synth``)
------------------------------------------------
``SynthOptions(sequences, frames_per_sequence, seed=0, size=(1280, 1024), test_fraction=0.25,
difficulty="normal")`` and ``generate_dataset(out, options, workers=1) -> SynthReport``. It writes
``OUT/seq_N/left_frames/frameNNN.png``, ``OUT/seq_N/vqla/label/frameNNN.txt`` (lines
``question|answer|x1,y1,x2,y2``, pixel boxes), the dense ground truth ``OUT/seq_N/vqla/dense/frameNNN.png``
(``FrameTruth.mask``) and ``frameNNN.json`` (``FrameTruth.dense_record()``: states, boxes, tips),
``OUT/splits.json`` ``{"train": [...], "test": [...]}``
and ``OUT/synth.json`` (the options; only a folder holding it may be overwritten).
:func:`surgery_r1_ros.data.vqla.load_vqla` reads the result like real EndoVis-18-VQLA.
``SynthReport.summary()`` says frames, QA pairs, seconds and frames/s.

Streaming API (stable; the rosbag synthesis builds on it)
--------------------------------------------------------
``render_sequence(seed, n_frames, size=(1280, 1024), difficulty="normal", continuous=True)`` yields
``(frame, truth)`` per frame:

- ``frame``: RGB ``uint8`` array of shape ``(height, width, 3)`` (a new array each frame).
- ``truth``: :class:`FrameTruth` with ``index``, ``size`` (w, h), ``organ`` ("kidney"),
  ``organ_box`` and ``instruments``: a list of :class:`InstrumentTruth` ``(name, state, box,
  quadrant, tip)``, sorted in vocabulary order. Boxes are whole-pixel ``(x1, y1, x2, y2)`` tuples
  inside the frame: the whole visible instrument (shaft included, like EndoVis) or the whole organ.
  ``quadrant`` is :func:`surgery_r1_ros.boxes.quadrant_of` of the box.
- ``truth.qas()`` -> ``[(question, answer, box), ...]`` (organ question, then state and location
  questions per instrument) and ``truth.qa_lines()`` -> the label file's lines.
- ``truth.mask``: ``(height, width)`` uint8, 0 tissue, 1..8 the instrument (vocabulary index + 1) whose body
  covers the pixel (a tool in front hides the one behind), ``ORGAN_LABEL`` (9) the organ.

With ``continuous=True`` the frames are a 30 Hz video: tips drift a few pixels per frame, shafts
turn slowly, a state holds for 18-63 frames and then changes, now and then an instrument leaves or
a new one enters. ``continuous=False`` gives an independent layout every frame.

Difficulty (``easy`` / ``normal`` / ``hard``) sets noise, blur, motion blur, smoke haze, blood on
instruments, brightness and vignetting (see :data:`surgery_r1_ros.data.synth.scene.DIFFICULTY`).
"""

from surgery_r1_ros.data.synth.scene import (
    DEFAULT_SIZE,
    DIFFICULTIES,
    ORGAN_LABEL,
    FrameTruth,
    InstrumentTruth,
    render_sequence,
)
from surgery_r1_ros.data.synth.writer import (
    DENSE_DIR,
    MARKER,
    SynthOptions,
    SynthReport,
    generate_dataset,
    sequence_seed,
    split_sequences,
)

__all__ = [
    "DEFAULT_SIZE",
    "DENSE_DIR",
    "DIFFICULTIES",
    "MARKER",
    "ORGAN_LABEL",
    "FrameTruth",
    "InstrumentTruth",
    "SynthOptions",
    "SynthReport",
    "generate_dataset",
    "render_sequence",
    "sequence_seed",
    "split_sequences",
]
