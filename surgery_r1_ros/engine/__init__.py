"""Runtime inference: frame-ahead encoding and grounded answers, on pluggable backends."""

from surgery_r1_ros.engine.backends import Backend, EngineError, available_backends, create_backend, register_backend
from surgery_r1_ros.engine.engine import Engine, GroundedAnswer, check_image, check_question, question_subject

__all__ = [
    "Backend",
    "Engine",
    "EngineError",
    "GroundedAnswer",
    "available_backends",
    "check_image",
    "check_question",
    "create_backend",
    "question_subject",
    "register_backend",
]
