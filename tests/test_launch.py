"""Launch files and config/surgery_r1.yaml checked against the node, without ROS.

`launch`/`launch_ros` are not installable here (PyPI's `launch` is an unrelated project), so the launch
files are read with ``ast``, never imported. The node's parameters come from its ROS-free table
(``surgery_r1_ros.node.params``), the one the node declares from.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from surgery_r1_ros.node.params import (
    BUILTIN_PARAMETERS,
    DEFAULT_IMAGE_TOPIC,
    DEFAULT_RIG,
    DEFAULTS,
    EXECUTABLE,
    PARAMETER_NAMES,
)

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
COMMON_ARGS = {"namespace", "rig_name", "model_path", "backend", "device", "params_file", "use_sim_time"}
REQUIRED_ARGS = {"surgery_r1.launch.py": COMMON_ARGS | {"camera_side"}, "dvrk_stereo.launch.py": COMMON_ARGS}


# --- a small reader of launch files -----------------------------------------------------------------------


def _call_name(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


@dataclass
class NodeAction:
    kwargs: dict[str, ast.AST]
    env: dict[str, object]  # constant arguments of the function that builds it (eye("left"))


@dataclass
class LaunchFile:
    path: Path
    tree: ast.Module
    constants: dict[str, object] = field(default_factory=dict)
    assigned: dict[str, ast.AST] = field(default_factory=dict)
    arguments: dict[str, ast.Call] = field(default_factory=dict)
    nodes: list[NodeAction] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> LaunchFile:
        lf = cls(path, ast.parse(path.read_text(), str(path)))
        for stmt in lf.tree.body:  # module constants such as DEFAULT_IMAGE_TOPIC
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
                for target in stmt.targets:
                    lf.constants[target.id] = stmt.value.value
        for node in ast.walk(lf.tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                lf.assigned[node.targets[0].id] = node.value
            if isinstance(node, ast.Call) and _call_name(node) == "DeclareLaunchArgument":
                lf.arguments[lf.const(node.args[0])] = node
        lf._find_nodes()
        return lf

    def _find_nodes(self) -> None:
        functions = {f.name: f for f in ast.walk(self.tree) if isinstance(f, ast.FunctionDef)}
        for fn in functions.values():
            calls = [c for c in ast.walk(fn) if isinstance(c, ast.Call) and _call_name(c) == "Node"]
            if not calls:
                continue
            # the function's constant call sites (eye("left"), eye("right")), or one call with no arguments
            sites = [c for c in ast.walk(self.tree) if isinstance(c, ast.Call) and _call_name(c) == fn.name]
            params = [a.arg for a in fn.args.args]
            envs = [dict(zip(params, (self.const(a) for a in c.args), strict=False)) for c in sites] or [{}]
            for call in calls:
                for env in envs:
                    self.nodes.append(NodeAction({k.arg: k.value for k in call.keywords}, env))

    def const(self, node: ast.AST, env: dict | None = None) -> object:
        """Evaluate constants, module constants, f-strings and string concatenation; None otherwise."""
        env = env or {}
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env.get(node.id, self.constants.get(node.id))
        if isinstance(node, ast.JoinedStr):
            parts = [self.const(v.value if isinstance(v, ast.FormattedValue) else v, env) for v in node.values]
            return None if any(p is None for p in parts) else "".join(str(p) for p in parts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.const(node.left, env), self.const(node.right, env)
            return None if left is None or right is None else left + right
        return None

    def configs(self, node: ast.AST, seen: frozenset = frozenset()) -> set[str]:
        """LaunchConfiguration names used in ``node``, following local variables."""
        found: set[str] = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and _call_name(sub) == "LaunchConfiguration":
                found.add(self.const(sub.args[0]))
            elif isinstance(sub, ast.Name) and sub.id in self.assigned and sub.id not in seen:
                found |= self.configs(self.assigned[sub.id], seen | {sub.id})
        return found

    def strings(self, node: ast.AST, env: dict, seen: frozenset = frozenset()) -> list[str]:
        """String pieces in ``node`` (following local variables), e.g. a remapping target's parts."""
        out: list[str] = []
        for sub in ast.walk(node):
            value = self.const(sub, env) if isinstance(sub, (ast.Constant, ast.JoinedStr)) else None
            if isinstance(value, str):
                out.append(value)
            elif isinstance(sub, ast.Name) and sub.id in self.assigned and sub.id not in seen:
                out += self.strings(self.assigned[sub.id], env, seen | {sub.id})
        return out

    def argument_kw(self, name: str, key: str) -> ast.AST | None:
        for kw in self.arguments[name].keywords:
            if kw.arg == key:
                return kw.value
        return None


LAUNCH_FILES = sorted(LAUNCH.glob("*.launch.py"))


@pytest.fixture(params=[p.name for p in LAUNCH_FILES])
def launch_file(request) -> LaunchFile:
    return LaunchFile.read(LAUNCH / request.param)


def test_both_launch_files_exist():
    assert {p.name for p in LAUNCH_FILES} >= set(REQUIRED_ARGS)


# --- the checks -----------------------------------------------------------------------------------------


def test_arguments_are_declared_with_defaults_and_descriptions(launch_file):
    assert set(launch_file.arguments) >= REQUIRED_ARGS[launch_file.path.name]
    for name in launch_file.arguments:
        description = launch_file.argument_kw(name, "description")
        assert isinstance(launch_file.const(description), str) and launch_file.const(description).strip(), name
        assert launch_file.argument_kw(name, "default_value") is not None, f"{name} has no default"


def test_every_argument_reaches_a_parameter_or_remapping(launch_file):
    assert launch_file.nodes, "no Node action"
    reached: dict[str, set[str]] = {}
    for node in launch_file.nodes:
        for key in ("namespace", "name", "remappings"):
            for arg in launch_file.configs(node.kwargs.get(key, ast.Constant(None))):
                reached.setdefault(arg, set()).add(key)
        parameters = node.kwargs["parameters"]
        assert isinstance(parameters, ast.List)
        for element in parameters.elts:
            if isinstance(element, ast.Dict):
                for key, value in zip(element.keys, element.values, strict=True):
                    param = launch_file.const(key)
                    assert param in PARAMETER_NAMES | BUILTIN_PARAMETERS, f"{param!r} is not a node parameter"
                    for arg in launch_file.configs(value):
                        reached.setdefault(arg, set()).add(f"parameter {param}")
            else:  # a parameters file
                for arg in launch_file.configs(element):
                    reached.setdefault(arg, set()).add("params file")
    unused = set(launch_file.arguments) - set(reached)
    assert not unused, f"launch arguments that reach no parameter or remapping: {sorted(unused)}"
    assert "params file" in reached["params_file"]
    assert "parameter use_sim_time" in reached["use_sim_time"]
    assert reached["rig_name"] == {"remappings"}


def test_nodes_run_the_installed_executable(launch_file):
    setup = (ROOT / "setup.py").read_text()
    assert re.search(rf'"{EXECUTABLE}\s*=\s*surgery_r1_ros\.node\.node:main"', setup), "console script missing"
    node_module = ast.parse((ROOT / "surgery_r1_ros" / "node" / "node.py").read_text())
    assert any(isinstance(f, ast.FunctionDef) and f.name == "main" for f in node_module.body)
    for node in launch_file.nodes:
        assert launch_file.const(node.kwargs["package"]) == "surgery_r1_ros"
        assert launch_file.const(node.kwargs["executable"]) == EXECUTABLE
    names = [launch_file.const(n.kwargs["name"], n.env) for n in launch_file.nodes]
    assert all(names) and len(set(names)) == len(names), f"node names must be distinct: {names}"


def test_image_topic_comes_in_through_remappings(launch_file):
    sides = set()
    for node in launch_file.nodes:
        remaps = node.kwargs["remappings"]
        sources = [launch_file.const(pair.elts[0]) for pair in remaps.elts]
        assert sources == [DEFAULT_IMAGE_TOPIC, DEFAULT_IMAGE_TOPIC + "/compressed"]
        for pair in remaps.elts:
            target = pair.elts[1]
            assert "rig_name" in launch_file.configs(target)
            pieces = "".join(launch_file.strings(target, node.env))
            assert "image_raw" in pieces
        side_piece = "".join(launch_file.strings(remaps.elts[0].elts[1], node.env))
        sides |= {s for s in ("left", "right") if f"/{s}/" in side_piece} or {"camera_side"}
        if "camera_side" in launch_file.arguments:
            assert "camera_side" in launch_file.configs(remaps)
    if launch_file.path.name == "dvrk_stereo.launch.py":
        assert sides == {"left", "right"}, "dvrk_stereo must start a left and a right eye"


def test_defaults_agree_with_the_node(launch_file):
    """One default everywhere: the launch arguments' defaults are the node's."""
    for arg in ("model_path", "backend", "device"):
        assert launch_file.const(launch_file.argument_kw(arg, "default_value")) == DEFAULTS[arg], arg
    assert launch_file.const(launch_file.argument_kw("rig_name", "default_value")) == DEFAULT_RIG
    if "camera_side" in launch_file.arguments:
        side = launch_file.const(launch_file.argument_kw("camera_side", "default_value"))
        assert f"/{DEFAULT_RIG}/{side}/image_raw" == DEFAULT_IMAGE_TOPIC
    assert launch_file.const(launch_file.argument_kw("use_sim_time", "default_value")) == "false"
    params_default = launch_file.argument_kw("params_file", "default_value")
    pieces = launch_file.strings(params_default, {})
    # PathJoinSubstitution([FindPackageShare("surgery_r1_ros"), "config", "surgery_r1.yaml"])
    assert {"surgery_r1_ros", "config", "surgery_r1.yaml"} <= set(pieces)
    assert (ROOT / "config" / "surgery_r1.yaml").is_file()


def test_launch_and_config_files_are_installed():
    setup = (ROOT / "setup.py").read_text()
    launch_glob = re.search(r'glob\("(launch/[^"]+)"\)', setup).group(1)
    for path in LAUNCH_FILES:
        assert fnmatch.fnmatch(f"launch/{path.name}", launch_glob)
    assert 'glob("config/*.yaml")' in setup


def test_yaml_holds_exactly_the_node_parameters_with_its_defaults():
    data = yaml.safe_load((ROOT / "config" / "surgery_r1.yaml").read_text())
    assert list(data) == ["/**"]
    params = data["/**"]["ros__parameters"]
    assert set(params) == PARAMETER_NAMES, set(params) ^ PARAMETER_NAMES
    for name, value in params.items():
        default = DEFAULTS[name]
        assert type(value) is type(default) and value == default, f"{name}: YAML {value!r} != node {default!r}"
