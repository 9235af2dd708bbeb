"""Runtime inference: frame-ahead encoding and grounded answers, on pluggable backends.

The public contract is ``engine.api`` (re-exported here): ``open_engine``, ``EngineProtocol``,
``GroundedAnswer``, ``Progress``, ``Cancelled``, ``InputError``, ``EngineError`` and the input checks.
``Engine`` (the built-in engine) is imported on first use, so importing this package stays light.
"""

from typing import Any

from surgery_r1_ros.engine.api import (
    MAX_QUESTION_LENGTH,
    Cancelled,
    EngineError,
    EngineProtocol,
    GroundedAnswer,
    InputError,
    Progress,
    check_question,
    check_rgb,
    open_engine,
)
from surgery_r1_ros.engine.backends import available_backends


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from surgery_r1_ros.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MAX_QUESTION_LENGTH",
    "Cancelled",
    "Engine",
    "EngineError",
    "EngineProtocol",
    "GroundedAnswer",
    "InputError",
    "Progress",
    "available_backends",
    "check_question",
    "check_rgb",
    "open_engine",
]
