"""TensorRT engine building without TensorRT: the missing-module error, cache keys, profiles, and the build
flow against a stand-in ``tensorrt`` module (the real API is only exercised on a CUDA machine)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from surgery_r1_ros.export import tensorrt_build as tb
from surgery_r1_ros.export.onnx_export import onnx_sha256

from surgery_r1_ros.cli import main
from surgery_r1_ros.engine import EngineError
from surgery_r1_ros.engine import artifacts as art
from surgery_r1_ros.engine.artifacts import FORMAT, FORMAT_VERSION, MANIFEST
from surgery_r1_ros.engine.backends import create_backend
from surgery_r1_ros.engine.tensorrt_backend import TensorRTNotInstalled, import_tensorrt

HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB = 32, 2, 8, 2, 64
PAST = [f"past_{k}.{i}" for i in range(LAYERS) for k in ("key", "value")]
PRESENT = [f"present_{k}.{i}" for i in range(LAYERS) for k in ("key", "value")]


def _graph_file(path: Path, inputs: list[tuple[str, list]], outputs: list[tuple[str, list, str]]) -> None:
    """A small valid ONNX graph with these input/output names (each output an Identity of the first input)."""

    def info(name, shape, dtype=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, dtype, shape)

    nodes = [helper.make_node("Identity", [inputs[0][0]], [name]) for name, _, _ in outputs]
    graph = helper.make_graph(nodes, "g", [info(n, s) for n, s in inputs], [info(n, s) for n, s, _ in outputs])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture
def fake_export(tmp_path) -> Path:
    folder = tmp_path / "onnx"
    folder.mkdir()
    _graph_file(folder / "vision.onnx", [("pixel_values", [16, 1176])], [("image_embeds", [16, 1176], "f")])
    dec_inputs = [
        ("inputs_embeds", [1, "seq", HIDDEN]),
        ("attention_mask", [1, "total"]),
        ("position_ids", [3, 1, "seq"]),
    ]
    dec_inputs += [(n, [1, HEADS, "past", HEAD_DIM]) for n in PAST]
    _graph_file(folder / "decoder.onnx", dec_inputs, [("logits", [1, "seq", HIDDEN], "f")])
    np.save(folder / "embed_tokens.npy", np.zeros((VOCAB, HIDDEN), np.float32))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "opset": 17,
        "image_grid_thw": [1, 4, 4], "num_image_tokens": 4, "prefix_tokens": 20, "spatial_merge_size": 2,
        "text": {"num_layers": LAYERS, "num_kv_heads": HEADS, "head_dim": HEAD_DIM, "hidden_size": HIDDEN,
                 "vocab_size": VOCAB},
        "files": {"vision": "vision.onnx", "decoder": "decoder.onnx", "embeddings": "embed_tokens.npy",
                  "processor": "processor"},
        "vision": {"inputs": [{"name": "pixel_values", "shape": [16, 1176], "dtype": "float32"}], "outputs": []},
        "decoder": {"inputs": [], "outputs": [], "past_names": PAST, "present_names": PRESENT},
        "sha256": {},
    }  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


class _FakeTensorRT(types.ModuleType):
    """Just enough of the TensorRT 10 builder API to run build_engines; records what was asked of it."""

    def __init__(self) -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.99.0-fake"
        self.builds: list[dict] = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level) -> None:
                self.level = level

        class Input:
            def __init__(self, value_info) -> None:
                dims = value_info.type.tensor_type.shape.dim
                self.name = value_info.name
                self.shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)

        class Network:
            def __init__(self) -> None:
                self.inputs: list[Input] = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Input:
                return self.inputs[i]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger) -> None:
                self.network = network

            def parse_from_file(self, path: str) -> bool:
                self.network.inputs = [Input(v) for v in onnx.load(path).graph.input]
                return True

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict = {}

            def set_shape(self, name, lo, opt, hi) -> None:
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (name, lo, opt, hi)
                self.shapes[name] = (lo, opt, hi)

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"+timed"

        class Config:
            def __init__(self) -> None:
                self.flags: list = []
                self.profiles: list[Profile] = []

            def set_memory_pool_limit(self, pool, size) -> None:
                self.workspace = size

            def set_flag(self, flag) -> None:
                self.flags.append(flag)

            def create_timing_cache(self, data: bytes) -> TimingCache:
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch) -> None:
                self.cache = cache

            def get_timing_cache(self) -> TimingCache:
                return self.cache

            def add_optimization_profile(self, profile) -> None:
                self.profiles.append(profile)

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags) -> Network:
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network, config) -> bytes:
                fake.builds.append({"inputs": [i.name for i in network.inputs], "flags": list(config.flags),
                                    "profiles": [p.shapes for p in config.profiles]})  # fmt: skip
                return b"serialized-engine"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")


def test_missing_tensorrt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTNotInstalled, match="pip install tensorrt on a CUDA machine"):
        import_tensorrt()
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        create_backend("tensorrt", None)


def test_cli_without_tensorrt_fails_in_one_line(monkeypatch, fake_export, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["export", "tensorrt", "--onnx", str(fake_export), "--out", str(tmp_path / "engines")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed: pip install tensorrt" in err and "Traceback" not in err
    assert main(["export", "tensorrt", "--onnx", str(fake_export), "--out", str(tmp_path / "e"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["engines"]["decoder"]["engine"].startswith("decoder-")
    assert "not-installed" not in plan["engines"]["decoder"]["engine"]  # the version is hashed into the key


def test_engine_cache_key_follows_onnx_hash_precision_profiles_and_version():
    profiles = [{"x": ((1, 1), (1, 4), (1, 8))}]
    name = art.engine_filename("decoder.onnx", "ab" * 32, "fp16", profiles, "10.3.0")
    assert name.startswith("decoder-" + "ab" * 6 + "-fp16-") and name.endswith(".engine")
    assert name == art.engine_filename("decoder.onnx", "ab" * 32, "fp16", profiles, "10.3.0")
    others = {
        art.engine_filename("decoder.onnx", "cd" * 32, "fp16", profiles, "10.3.0"),
        art.engine_filename("decoder.onnx", "ab" * 32, "bf16", profiles, "10.3.0"),
        art.engine_filename("decoder.onnx", "ab" * 32, "fp16", [{"x": ((1, 1), (1, 4), (1, 9))}], "10.3.0"),
        art.engine_filename("decoder.onnx", "ab" * 32, "fp16", profiles, "10.4.0"),
    }
    assert name not in others and len(others) == 4


def test_decoder_profiles_follow_the_manifest(fake_export):
    manifest = json.loads((fake_export / MANIFEST).read_text())
    settings = tb.BuildSettings(max_new_tokens=100, max_question_tokens=40)
    profiles = tb.decoder_profiles(manifest, settings)
    assert list(profiles) == ["prefill", "decode"]
    limits = tb.sequence_limits(manifest, settings)
    assert limits == {"prefix": 20, "max_prefill_seq": 40, "past_after_prefix": 21, "max_past": 161}
    for profile in profiles.values():
        assert set(profile) == {"inputs_embeds", "attention_mask", "position_ids", *PAST}
        for lo, opt, hi in profile.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True))
        for k in range(3):  # attention mask covers past + new tokens
            assert profile["attention_mask"][k][1] == profile[PAST[0]][k][2] + profile["inputs_embeds"][k][1]
        assert profile[PAST[0]][0][1] == HEADS and profile[PAST[0]][0][3] == HEAD_DIM
    prefill, decode = profiles["prefill"], profiles["decode"]
    assert prefill["inputs_embeds"][1] == (1, 20, HIDDEN)  # optimised for the image prefix
    assert prefill["inputs_embeds"][2] == (1, 40, HIDDEN)
    assert prefill[PAST[0]][0][2] == tb.DUMMY_PAST  # prefix prefill after the one-token dummy past
    assert decode["inputs_embeds"] == ((1, 1, HIDDEN),) * 3
    assert decode[PAST[0]][0][2] == 21 and decode[PAST[0]][2][2] == 160
    assert tb.vision_shapes(manifest) == {"pixel_values": ((16, 1176),) * 3}
    with pytest.raises(ValueError, match="precision"):
        tb.BuildSettings(precision="int4")


def test_build_engines_uses_profiles_flags_timing_cache_and_skips_cached(monkeypatch, fake_export, tmp_path):
    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    out = tmp_path / "engines"
    manifest = tb.build_engines(fake_export, out, tb.BuildSettings(precision="bf16"))
    assert len(fake.builds) == 2
    vision, decoder = fake.builds
    assert vision["profiles"] == []  # static shapes: no profile needed
    assert len(decoder["profiles"]) == 2 and decoder["flags"] == ["BF16"]
    assert decoder["profiles"][1]["inputs_embeds"][0] == (1, 1, HIDDEN)
    assert (out / art.TIMING_CACHE).read_bytes().endswith(b"+timed")
    written = art.load_trt_manifest(out)
    assert written["onnx_dir"] == str(fake_export.resolve())
    sha = onnx_sha256(fake_export / "decoder.onnx")
    assert manifest["engines"]["decoder"]["onnx_sha256"] == sha and sha[:12] in manifest["engines"]["decoder"]["engine"]
    for entry in manifest["engines"].values():
        assert (out / entry["engine"]).read_bytes() == b"serialized-engine"

    tb.build_engines(fake_export, out, tb.BuildSettings(precision="bf16"))
    assert len(fake.builds) == 2  # same ONNX hash, precision and profiles: nothing rebuilt
    tb.build_engines(fake_export, out, tb.BuildSettings(precision="fp16"))
    assert len(fake.builds) == 4 and fake.builds[-1]["flags"] == ["FP16"]
    with pytest.raises(FileNotFoundError, match=r"tensorrt_manifest\.json"):
        art.load_trt_manifest(tmp_path)


def test_the_runtime_finds_cached_engines_without_the_build_tooling(monkeypatch, fake_export, tmp_path):
    """``cached_engines`` (torch-free, no export import) accepts engines only for the same ONNX bytes and settings."""
    manifest = json.loads((fake_export / MANIFEST).read_text())
    manifest["sha256"] = {name: onnx_sha256(fake_export / name) for name in ("vision.onnx", "decoder.onnx")}
    (fake_export / MANIFEST).write_text(json.dumps(manifest))
    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    out = tmp_path / "engines"
    assert not art.cached_engines(out, fake_export, {"precision": "bf16"}, fake.__version__)
    assert art.tensorrt_engines_for(fake_export, out, {"precision": "bf16"}, fake.__version__) == out
    assert len(fake.builds) == 2
    assert art.cached_engines(out, fake_export, {"precision": "bf16"}, fake.__version__)
    assert not art.cached_engines(out, fake_export, {"precision": "fp16"}, fake.__version__)
    assert not art.cached_engines(out, fake_export, {"precision": "bf16"}, "10.100.0")
    art.tensorrt_engines_for(fake_export, out, {"precision": "bf16"}, fake.__version__)
    assert len(fake.builds) == 2  # cached: not built again
    manifest["sha256"]["decoder.onnx"] = "0" * 64  # a re-export with other bytes
    (fake_export / MANIFEST).write_text(json.dumps(manifest))
    assert not art.cached_engines(out, fake_export, {"precision": "bf16"}, fake.__version__)
