"""An engine that knows the answers, for ``bag eval`` tests: ``backend:=bag_oracle:OracleEngine``.

``BAG_ORACLE_TABLE`` names a JSON file ``{sha1 of the frame's RGB bytes: {question: [answer, box]}}``
built by the test from the bag and its questions sidecar. A frame and question found there get the true
answer and box (so a correct pipeline scores accuracy 1 and IoU 1); anything else gets "Idle" and no box.
Its reasoning names the box's position, so the node's coherence flag is true. Answers in ~10 ms.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from surgery_r1_ros.coherence import describe_position
from surgery_r1_ros.engine.api import GroundedAnswer
from surgery_r1_ros.vocab import parse_question


def frame_key(rgb: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()


class OracleEngine:
    def __init__(self, model=None, device=None, **_options) -> None:
        with open(os.environ["BAG_ORACLE_TABLE"]) as f:
            self.table = json.load(f)

    def encode(self, image, stamp=None):
        return stamp  # nothing to encode ahead: answers come from the table

    def ask(self, question, image=None, stamp=None, reasoning=False, max_new_tokens=None, *, on_token=None,
            cancelled=None) -> GroundedAnswer:  # fmt: skip
        start = time.perf_counter()
        time.sleep(0.01)
        known = self.table.get(frame_key(image), {}).get(question)
        if known is None:
            return GroundedAnswer("Idle", None, None, False, (time.perf_counter() - start) * 1e3)
        answer, box = known
        box = tuple(round(v) for v in box)
        text = None
        if reasoning:
            _, subject = parse_question(question)
            where = describe_position(box, (image.shape[1], image.shape[0]))
            text = f"The {subject or 'organ'} is in the {where} of the view. The answer is {answer}."
        return GroundedAnswer(answer, text, box, True, (time.perf_counter() - start) * 1e3)

    def close(self) -> None:
        self.table = {}
