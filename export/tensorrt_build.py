"""TensorRT engines from the ONNX export, with the TensorRT Python API.

For each of ``vision.onnx`` and ``decoder.onnx``: ``OnnxParser`` fills a ``NetworkDefinition``, a
``BuilderConfig`` gets the precision flag (fp16 or bf16; fp32 when neither), a workspace limit, a timing
cache read from and written back to ``timing.cache`` (so later builds skip kernel timing), and optimization
profiles for the decoder's dynamic sequence / past lengths, computed from ``export_manifest.json``:

- ``prefill`` (profile 0): the image prefix (after a one-token masked dummy past: TensorRT needs no
  zero-length tensors that way) or a question on top of the prefix;
- ``decode`` (profile 1): one new token on a past that grows to prefix + question + ``max_new_tokens``.

Engines are cached: a file name holds the sha256 of the ONNX file (and its external data), the precision,
the profiles and the TensorRT version, so an unchanged export is never rebuilt. ``tensorrt_manifest.json``
beside the engines tells the TensorRT backend what is where (names and cache keys:
``surgery_r1_ros.engine.artifacts``).

TensorRT cannot be installed on the CPU development machines: everything that needs no ``tensorrt``
(profiles, cache keys, the missing-module error) is tested there; building was written against the
TensorRT 10 API and must be verified on a CUDA machine.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from surgery_r1_ros.engine.artifacts import (
    TIMING_CACHE,
    TRT_FORMAT,
    TRT_MANIFEST,
    engine_filename,
    load_manifest,
)
from surgery_r1_ros.engine.tensorrt_backend import import_tensorrt

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
# The prefix prefill runs after a masked one-token dummy past (see module docstring).
DUMMY_PAST = 1

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@dataclass(frozen=True)
class BuildSettings:
    precision: str = "fp16"
    max_new_tokens: int = 256  # longest answer (reasoning mode) the decode profile must hold
    max_question_tokens: int = 96  # longest question suffix (question + instruction + chat tokens)
    workspace_gb: float = 8.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.max_new_tokens < 1 or self.max_question_tokens < 1:
            raise ValueError("max_new_tokens and max_question_tokens must be at least 1")


# --------------------------------------------------------------------------------------------- profiles


def sequence_limits(manifest: dict, settings: BuildSettings) -> dict[str, int]:
    """Token counts the decoder engine must handle, from the manifest's prefix length."""
    prefix = int(manifest.get("prefix_tokens") or int(manifest["num_image_tokens"]) + 32)
    past_prefix = DUMMY_PAST + prefix
    return {
        "prefix": prefix,
        "max_prefill_seq": max(prefix, settings.max_question_tokens),
        "past_after_prefix": past_prefix,
        "max_past": past_prefix + settings.max_question_tokens + settings.max_new_tokens,
    }


def decoder_profiles(manifest: dict, settings: BuildSettings) -> dict[str, Profile]:
    """Optimization profiles (min, opt, max shapes per input) for the decoder: prefill and decode."""
    text = manifest["text"]
    hidden, heads, head_dim = int(text["hidden_size"]), int(text["num_kv_heads"]), int(text["head_dim"])
    limits = sequence_limits(manifest, settings)
    prefix, max_seq, max_past = limits["prefix"], limits["max_prefill_seq"], limits["max_past"]
    after_prefix = limits["past_after_prefix"]
    question = min(32, settings.max_question_tokens)

    def profile(seq: Shape, past: Shape) -> Profile:
        shapes: Profile = {
            "inputs_embeds": tuple((1, s, hidden) for s in seq),
            "attention_mask": tuple((1, p + s) for p, s in zip(past, seq, strict=True)),
            "position_ids": tuple((3, 1, s) for s in seq),
        }  # type: ignore[assignment]
        for name in manifest["decoder"]["past_names"]:
            shapes[name] = tuple((1, heads, p, head_dim) for p in past)  # type: ignore[assignment]
        return shapes

    # prefill: the prefix on the dummy past (opt), or a question on the prefix; decode: one token.
    prefill = profile(seq=(1, prefix, max_seq), past=(DUMMY_PAST, DUMMY_PAST, max_past - 1))
    decode_opt = min(max_past - 1, after_prefix + question + settings.max_new_tokens // 4)
    decode = profile(seq=(1, 1, 1), past=(after_prefix, decode_opt, max_past - 1))
    return {"prefill": prefill, "decode": decode}


def vision_shapes(manifest: dict) -> Profile:
    """The vision encoder's one fixed input shape, as a profile (min = opt = max)."""
    spec = manifest["vision"]["inputs"][0]
    shape = tuple(int(v) for v in spec["shape"])
    return {spec["name"]: (shape, shape, shape)}


# --------------------------------------------------------------------------------------------- building


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile], settings: BuildSettings,
                 timing_cache: Path, trt=None) -> Path:  # fmt: skip
    """Parse ``onnx_path``, build with ``profiles`` and write ``engine_path`` (skipped if it exists)."""
    if engine_path.is_file():
        log.info("TensorRT engine %s is cached (same ONNX hash, precision and profiles): not rebuilt", engine_path.name)
        return engine_path
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * (1 << 30)))
    if settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif settings.precision == "bf16":
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise RuntimeError(f"TensorRT {trt.__version__} has no BF16 builder flag (TensorRT 9+ has): use --fp16")
        config.set_flag(trt.BuilderFlag.BF16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    dynamic = any(-1 in tuple(network.get_input(i).shape) for i in range(network.num_inputs))
    for shapes in profiles if dynamic else []:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_suffix(".partial")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("built %s in %.0f s", engine_path.name, time.perf_counter() - start)
    return engine_path


def plan_engines(onnx_dir: str | Path, settings: BuildSettings, trt_version: str) -> dict:
    """What would be built: engine file names (cache keys) and profiles, without TensorRT."""
    from surgery_r1_ros.export.onnx_export import onnx_sha256

    onnx_dir = Path(onnx_dir).expanduser()
    manifest = load_manifest(onnx_dir)
    plan: dict = {"engines": {}, "profiles": {}}
    for part, profiles in (("vision", [vision_shapes(manifest)]),
                           ("decoder", list(decoder_profiles(manifest, settings).values()))):  # fmt: skip
        file = manifest["files"][part]
        sha = onnx_sha256(onnx_dir / file)
        recorded = manifest.get("sha256", {}).get(file)
        if recorded and recorded != sha:
            log.warning("%s changed since the export (sha256 differs from the manifest)", file)
        plan["engines"][part] = {
            "onnx": file,
            "onnx_sha256": sha,
            "engine": engine_filename(file, sha, settings.precision, profiles, trt_version),
        }
        plan["profiles"][part] = profiles
    plan["profile_names"] = {"decoder": list(decoder_profiles(manifest, settings))}
    plan["limits"] = sequence_limits(manifest, settings)
    return plan


def build_engines(onnx_dir: str | Path, out_dir: str | Path, settings: BuildSettings | None = None) -> dict:
    """Build (or reuse) the vision and decoder engines of an export; returns the manifest written to out_dir."""
    settings = settings or BuildSettings()
    trt = import_tensorrt()
    onnx_dir, out = Path(onnx_dir).expanduser().resolve(), Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_engines(onnx_dir, settings, trt.__version__)
    timing_cache = out / TIMING_CACHE
    start = time.perf_counter()
    for part, entry in plan["engines"].items():
        build_engine(onnx_dir / entry["onnx"], out / entry["engine"], plan["profiles"][part], settings, timing_cache,
                     trt=trt)  # fmt: skip
    manifest = {
        "format": TRT_FORMAT,
        "format_version": 1,
        "onnx_dir": str(onnx_dir),
        "tensorrt_version": trt.__version__,
        "settings": asdict(settings),
        "dummy_past": DUMMY_PAST,
        "timing_cache": TIMING_CACHE,
        **plan,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (out / TRT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
