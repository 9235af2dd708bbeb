"""The surgery_r1_interfaces package: built and installed (by `make setup`), with the fields the issue names."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "surgery_r1_interfaces"

ASK_REQUEST = {"question": "string", "reasoning": "boolean", "stamp": "builtin_interfaces/Time"}
ASK_RESPONSE = {
    "success": "boolean",
    "error": "string",
    "answer": "string",
    "reasoning": "string",
    "box": "sensor_msgs/RegionOfInterest",
    "coherent": "boolean",
    "image_header": "std_msgs/Header",
    "latency_ms": "float",
}
GROUNDED_ANSWER = {
    "header": "std_msgs/Header",
    "question": "string",
    "answer": "string",
    "reasoning": "string",
    "box": "sensor_msgs/RegionOfInterest",
    "coherent": "boolean",
    "latency_ms": "float",
}


def _has_fields(cls, expected: dict[str, str]) -> None:
    fields = cls.get_fields_and_field_types()
    for name, type_name in expected.items():
        assert fields.get(name) == type_name, f"{cls.__name__}.{name}: {fields.get(name)!r} != {type_name!r}"


def test_generated_python_types_have_the_issue_fields():
    srv = pytest.importorskip("surgery_r1_interfaces.srv", reason="run `make setup` to build the interfaces")
    msg = pytest.importorskip("surgery_r1_interfaces.msg")
    _has_fields(srv.AskQuestion.Request, ASK_REQUEST)
    _has_fields(srv.AskQuestion.Response, ASK_RESPONSE)
    _has_fields(msg.GroundedAnswer, GROUNDED_ANSWER)
    # a zero stamp (the default) means "the newest frame"; a zero-size box means "no box"
    request = srv.AskQuestion.Request()
    assert (request.stamp.sec, request.stamp.nanosec) == (0, 0)
    assert srv.AskQuestion.Response().box.width == 0


def test_interface_sources_declare_the_fields():
    """The .srv/.msg text itself (what colcon builds), independent of the installed build."""

    def fields(text: str) -> dict[str, str]:
        out = {}
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line and line != "---":
                type_name, name = line.split()[:2]
                out[name] = type_name
        return out

    request_text, response_text = (PKG / "srv" / "AskQuestion.srv").read_text().split("\n---\n")
    idl = {"boolean": "bool", "float": "float32"}
    for expected, text in ((ASK_REQUEST, request_text), (ASK_RESPONSE, response_text)):
        got = fields(text)
        for name, type_name in expected.items():
            assert got[name] == idl.get(type_name, type_name)
    got = fields((PKG / "msg" / "GroundedAnswer.msg").read_text())
    for name, type_name in GROUNDED_ANSWER.items():
        assert got[name] == idl.get(type_name, type_name)


def test_interface_package_manifest_and_cmake():
    root = ET.parse(PKG / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "surgery_r1_interfaces"
    assert root.findtext("member_of_group") == "rosidl_interface_packages"
    assert root.find("export/build_type").text == "ament_cmake"
    build_tools = {e.text for e in root.findall("buildtool_depend")}
    assert {"ament_cmake", "rosidl_default_generators"} <= build_tools
    depends = {e.text for e in root.findall("depend")}
    assert {"builtin_interfaces", "std_msgs", "sensor_msgs"} <= depends
    cmake = (PKG / "CMakeLists.txt").read_text()
    assert '"msg/GroundedAnswer.msg"' in cmake and '"srv/AskQuestion.srv"' in cmake
    # the fixes for the PyPI wheels are guarded, so colcon builds the same file against a sourced ROS 2
    # (cmake/ros_wheels.cmake decides: tests/test_ros_wheels_cmake.py)
    assert "if(SURGERY_R1_ROS_WHEELS)" in cmake


def test_root_package_depends_on_the_interfaces():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert "surgery_r1_interfaces" in {e.text for e in root.findall("exec_depend")}


ASK_FEEDBACK = {"reasoning": "string", "tokens": "uint32"}


def test_ask_action_goal_result_and_feedback():
    """The action's goal is the service request, its result the service response; feedback streams reasoning."""
    action = pytest.importorskip("surgery_r1_interfaces.action", reason="run `make setup` to build the interfaces")
    srv = pytest.importorskip("surgery_r1_interfaces.srv")
    ask = action.AskQuestion
    assert ask.Goal.get_fields_and_field_types() == srv.AskQuestion.Request.get_fields_and_field_types()
    assert ask.Result.get_fields_and_field_types() == srv.AskQuestion.Response.get_fields_and_field_types()
    assert ask.Feedback.get_fields_and_field_types() == ASK_FEEDBACK
    sections = (PKG / "action" / "AskQuestion.action").read_text().split("\n---\n")
    assert len(sections) == 3
    cmake = (PKG / "CMakeLists.txt").read_text()
    assert '"action/AskQuestion.action"' in cmake and "find_package(action_msgs REQUIRED)" in cmake
    root = ET.parse(PKG / "package.xml").getroot()
    assert "action_msgs" in {e.text for e in root.findall("depend")}
