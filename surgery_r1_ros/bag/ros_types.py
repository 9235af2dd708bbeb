"""Message types by name: the installed rclpy class, and the .msg definition for writing bags."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path


class MissingTypeError(RuntimeError):
    """A message type whose Python package is not installed (names the topic and the type)."""


def split_type(msgtype: str) -> tuple[str, str, str]:
    """``pkg/msg/Name`` (or ``pkg/Name``) -> (pkg, kind, Name)."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        return parts[0], "msg", parts[1]
    if len(parts) == 3 and parts[1] in ("msg", "srv", "action"):
        return parts[0], parts[1], parts[2]
    raise ValueError(f"{msgtype!r} is not a ROS type name like pkg/msg/Name")


def message_class(msgtype: str, topic: str | None = None):
    """The rclpy message class of ``msgtype`` (including service event/request/response types)."""
    where = f"topic {topic}: " if topic else ""
    pkg, kind, name = split_type(msgtype)
    try:
        module = importlib.import_module(f"{pkg}.{kind}")
    except ImportError:
        wheel = "ros-" + pkg.replace("_", "-")
        raise MissingTypeError(
            f"{where}type {msgtype}: its package {pkg!r} is not installed here "
            f"(in a ROS workspace: source it; in a venv: pip install {wheel}, if that wheel exists)"
        ) from None
    obj = getattr(module, name, None)
    if obj is None and kind in ("srv", "action"):
        for suffix in ("_Event", "_Request", "_Response", "_Goal", "_Result", "_Feedback"):
            if name.endswith(suffix):
                parent = getattr(module, name[: -len(suffix)], None)
                obj = getattr(parent, suffix[1:], None) if parent is not None else None
                break
    if obj is None:
        raise MissingTypeError(f"{where}type {msgtype}: package {pkg!r} is installed but has no {kind} {name!r}")
    return obj


_PRIMITIVES = {
    "bool",
    "byte",
    "char",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "string",
    "wstring",
    "time",
    "duration",
}


def _prefixes(pkg: str) -> list[Path]:
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    prefixes.append(Path(sys.prefix))
    try:
        module = importlib.import_module(pkg)
        if getattr(module, "__file__", None):
            # <prefix>/lib/pythonX.Y/site-packages/<pkg>/__init__.py
            prefixes.append(Path(module.__file__).resolve().parents[4])
    except ImportError:
        pass
    return prefixes


def find_definition(msgtype: str) -> str:
    """The text of the ``.msg`` (or ``.srv`` event) file of ``msgtype`` from the install's share folder."""
    pkg, kind, name = split_type(msgtype)
    for prefix in _prefixes(pkg):
        path = prefix / "share" / pkg / kind / f"{name}.{kind}"
        if path.exists():
            return path.read_text()
    raise MissingTypeError(f"type {msgtype}: no {name}.{kind} in share/{pkg}/{kind} of any install prefix")


def register_type(typestore, msgtype: str) -> None:
    """Make ``typestore`` know ``msgtype`` and every type it uses, from the installed .msg files."""
    from rosbags.typesys import get_types_from_msg

    pending = [msgtype]
    found: dict = {}
    while pending:
        current = pending.pop()
        if current in typestore.types or current in found:
            continue
        pkg, kind, _ = split_type(current)
        if kind != "msg":
            raise MissingTypeError(f"type {current}: recording {kind} types is not supported")
        text = find_definition(current)
        found.update(get_types_from_msg(text, current))
        for line in text.splitlines():
            tokens = line.split("#", 1)[0].split()
            if len(tokens) < 2:
                continue
            base = re.sub(r"\[.*$|<=\d+$", "", tokens[0])  # drop array and bound suffixes
            if base in _PRIMITIVES:
                continue  # constants are always primitive, so they end here too
            if base == "Header":
                dep = "std_msgs/msg/Header"
            elif "/" in base:
                dep = f"{base.split('/')[0]}/msg/{base.split('/')[-1]}"
            else:
                dep = f"{pkg}/msg/{base}"
            if dep not in typestore.types and dep not in found:
                pending.append(dep)
    if found:
        typestore.register(found)
