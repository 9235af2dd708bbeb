"""The node's parameters: one table that the node declares from and the launch/config tests read.

ROS-free on purpose: ``tests/test_launch*.py`` imports this module to check the launch files and
``config/surgery_r1.yaml`` against the node without starting ROS. One default for everything lives here
(the YAML repeats these values and a test keeps them equal).
"""

from __future__ import annotations

from dataclasses import dataclass

NODE_NAME = "surgery_r1"
EXECUTABLE = "surgery_r1_node"
# dVRK gscam default topic (rig "jhu_daVinci", left eye). Launch files remap instead of setting it.
DEFAULT_RIG = "jhu_daVinci"
DEFAULT_IMAGE_TOPIC = f"/{DEFAULT_RIG}/left/image_raw"
QOS_CHOICES = ("sensor_data", "reliable", "system_default")
EXECUTOR_CHOICES = ("single", "multi")


@dataclass(frozen=True)
class Param:
    name: str
    default: bool | int | float | str
    description: str
    read_only: bool = True  # changed through configure (cleanup, set, configure), not at runtime


PARAMETERS: tuple[Param, ...] = (
    # model (read in on_configure)
    Param("model_path", "", "Model folder; empty: the built-in model shipped in the package"),
    Param(
        "backend",
        "auto",
        "auto (the fastest measured: onnxruntime on CPU, torch on CUDA), torch, onnxruntime, tensorrt, "
        "or package.module:ClassName for a user engine class",
    ),
    Param("device", "auto", "Where the model runs: auto, cpu, cuda, cuda:N"),
    Param(
        "engine_process",
        True,
        "Run the model in its own process, so camera intake never holds it up (Python's GIL); false: in the "
        "node's process",
    ),
    Param("max_new_tokens", 0, "Cap on generated tokens per answer; 0: the model folder's default"),
    Param("warmup", True, "Run one dummy question at configure so the first real answer is not slow"),
    # camera input (read in on_activate)
    Param("image_topic", DEFAULT_IMAGE_TOPIC, "Camera image topic (raw sensor_msgs/Image)"),
    Param("compressed", False, "Subscribe sensor_msgs/CompressedImage on <image_topic>/compressed instead"),
    Param("image_qos", "sensor_data", f"Image subscription QoS: {', '.join(QOS_CHOICES)}"),
    Param("buffer_size", 10, "Newest frames kept for stamp lookup"),
    Param("stamp_tolerance_s", 0.05, "A request stamp matches a buffered frame this close to it"),
    Param("max_frame_age_s", 2.0, "Refuse to answer about a frame that arrived longer ago than this"),
    Param("encode_ahead", True, "Encode the newest frame while idle when the engine supports it"),
    # requests
    Param("max_question_length", 500, "Longest accepted question, in characters"),
    Param("max_queue", 4, "Requests waiting or running at once; more are refused with an error"),
    Param("publish_annotated", True, "Publish the answered frame with box and answer on ~/annotated_image"),
    Param("diagnostics_period_s", 1.0, "Period of the /diagnostics status"),
    # process
    Param("autostart", True, "main() configures and activates the node; false: wait for a lifecycle manager"),
    Param("executor", "single", "single: one thread spins, a worker runs the model; multi: MultiThreadedExecutor"),
)

PARAMETER_NAMES = frozenset(p.name for p in PARAMETERS)
# Declared by rclpy itself for every node; launch files and the YAML may set it too.
BUILTIN_PARAMETERS = frozenset({"use_sim_time"})
DEFAULTS = {p.name: p.default for p in PARAMETERS}
