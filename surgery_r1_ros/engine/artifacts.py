"""The export artifacts the runtime reads: ONNX export folders, TensorRT engine folders, and their cache.

``export/`` (installed as ``surgery_r1_ros.export``) writes these folders; the onnxruntime and TensorRT
backends read them through this module, which imports neither torch nor the export tooling. Layouts:

- ONNX export folder: ``export_manifest.json`` (format, shapes, token ids, sha256 of each ONNX file),
  ``vision.onnx``, ``decoder.onnx``, ``embed_tokens.npy``, ``processor/``.
- TensorRT engine folder: ``tensorrt_manifest.json`` naming ``<part>-<onnx sha>-<precision>-<key>.engine``
  files (the key covers the ONNX bytes, precision, profiles and TensorRT version) and ``timing.cache``.
- Cache: a model folder's export lives in ``$SURGERY_R1_CACHE/onnx/<fingerprint>`` (default
  ``~/.cache/surgery_r1``), the fingerprint covering the folder's path, file names, sizes and times, the
  format version and the torch version; its engines in ``<export>/tensorrt``.

When a backend is given a model folder with no cached export, ``onnx_export_for`` runs the export once, as
one logged step that says where the result is cached; later starts reuse it. Likewise
``tensorrt_engines_for`` for engines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# -- ONNX export folder ----------------------------------------------------------------------------------
MANIFEST = "export_manifest.json"
FORMAT = "surgery_r1_onnx"
FORMAT_VERSION = 1
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
EMBEDDINGS_FILE = "embed_tokens.npy"
PROCESSOR_DIR = "processor"

# -- TensorRT engine folder ------------------------------------------------------------------------------
TRT_MANIFEST = "tensorrt_manifest.json"
TRT_FORMAT = "surgery_r1_tensorrt"
TIMING_CACHE = "timing.cache"
ENGINE_SUBDIR = "tensorrt"  # engines built for an export folder go here


def past_names(num_layers: int) -> list[str]:
    return [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_manifest(onnx_dir: str | Path) -> dict:
    """The manifest of an export folder, with a clear error when the folder is not one."""
    folder = Path(onnx_dir).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST}: it is not an ONNX export folder; make one with "
            "`surgery-r1 export onnx --out DIR`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest (re-export with this version)")
    for key in ("vision", "decoder", "embeddings"):
        file = folder / manifest["files"][key]
        if not file.is_file():
            raise FileNotFoundError(f"{file} named by {path} is missing; re-run the export")
    return manifest


def load_trt_manifest(engine_dir: str | Path) -> dict:
    path = Path(engine_dir).expanduser() / TRT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent} has no {TRT_MANIFEST}; build engines with "
            "`surgery-r1 export tensorrt --onnx ONNX_DIR --out DIR`"
        )
    return json.loads(path.read_text())


# -- cache keys ------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where exports made on demand (a backend given a model folder instead of an export folder) are kept."""
    root = os.environ.get("SURGERY_R1_CACHE") or Path.home() / ".cache" / "surgery_r1"
    return Path(root) / "onnx"


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


NOT_EXPORTED = (".md", ".csv", ".png")  # a model card, learning curves, plots: editing them keeps the export


def folder_fingerprint(folder: str | Path) -> str:
    """A cheap identity of a model folder: names, sizes and modification times of the files an export reads
    (no hashing of weights; documentation and training records left out)."""
    folder = Path(folder).expanduser().resolve()
    digest = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}/{_torch_version()}/{folder}".encode())
    for file in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in NOT_EXPORTED):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def onnx_cache_dir(model_folder: str | Path) -> Path:
    """The cache folder of ``model_folder``'s ONNX export (it may not exist yet)."""
    return cache_root() / folder_fingerprint(model_folder)


def profiles_digest(profiles: Any) -> str:
    return hashlib.sha256(json.dumps(profiles, sort_keys=True).encode()).hexdigest()[:12]


def engine_cache_key(onnx_sha256: str, precision: str, profiles: Any, trt_version: str) -> str:
    """What makes an engine reusable: the exact ONNX bytes, precision, profiles and TensorRT version."""
    text = json.dumps([onnx_sha256, precision, profiles_digest(profiles), trt_version], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def engine_filename(onnx_name: str, onnx_sha256: str, precision: str, profiles: Any, trt_version: str) -> str:
    """``decoder-<onnx sha[:12]>-fp16-<key>.engine``: the ONNX hash shows in the name, the key covers the rest."""
    stem = Path(onnx_name).stem
    key = engine_cache_key(onnx_sha256, precision, profiles, trt_version)
    return f"{stem}-{onnx_sha256[:12]}-{precision}-{key}.engine"


# -- finding or making the artifacts (the runtime's entry points) -----------------------------------------


def _usable_export(folder: Path) -> bool:
    try:
        load_manifest(folder)
    except (FileNotFoundError, ValueError) as err:
        if (folder / MANIFEST).exists():
            log.warning("cached export %s is unusable (%s); exporting again", folder, err)
        return False
    return True


def onnx_export_for(model: Any = None, onnx_dir: str | Path | None = None) -> Path:
    """An ONNX export folder for ``model``: ``onnx_dir``, an export folder given as the model, the cached
    export of a model folder (None: the built-in model), or, when there is none, a new export (logged).

    A ``LoadedModel`` with no folder is exported to a fresh temporary folder (not cached).
    """
    if onnx_dir is not None:
        load_manifest(onnx_dir)
        return Path(onnx_dir).expanduser()
    from surgery_r1_ros.model import BUILTIN_MODEL_DIR, LoadedModel

    if isinstance(model, LoadedModel):
        if model.path is None:
            out = Path(tempfile.mkdtemp(prefix="surgery_r1_onnx_"))
            return _export(None, out, reason="an in-memory model (not cached)", loaded=model)
        model = model.path
    folder = Path(model).expanduser() if model is not None else BUILTIN_MODEL_DIR
    if (folder / MANIFEST).is_file():
        load_manifest(folder)
        return folder
    out = onnx_cache_dir(folder)
    if _usable_export(out):
        log.info("using the cached ONNX export of %s: %s", folder, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    _export(folder, staging, reason=f"no cached export of {folder}; the result is cached in {out}")
    if out.exists():  # a concurrent export finished first, or a broken one is in the way
        shutil.rmtree(out, ignore_errors=True)
    try:
        staging.rename(out)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _export(folder: Path | None, out: Path, reason: str, loaded: Any = None) -> Path:
    """The one place the runtime runs the exporter (torch.onnx), logged before and after."""
    log.warning("exporting %s to ONNX now (%s); this runs once", folder or "the model", reason)
    from surgery_r1_ros.export.onnx_export import export_onnx

    start = time.perf_counter()
    export_onnx(folder, out, loaded=loaded)
    log.warning("ONNX export written to %s in %.0f s", out, time.perf_counter() - start)
    return out


def cached_engines(engine_dir: str | Path, onnx_dir: str | Path, settings: dict, trt_version: str) -> bool:
    """Whether ``engine_dir`` holds engines built from this export's ONNX files with these build settings."""
    try:
        trt = load_trt_manifest(engine_dir)
        export = load_manifest(onnx_dir)
    except (FileNotFoundError, ValueError):
        return False
    if trt.get("tensorrt_version") != trt_version:
        return False
    if any(trt.get("settings", {}).get(k) != v for k, v in settings.items()):
        return False
    for part, entry in trt.get("engines", {}).items():
        recorded = export.get("sha256", {}).get(export["files"][part])
        if recorded != entry.get("onnx_sha256") or not (Path(engine_dir) / entry["engine"]).is_file():
            return False
    return bool(trt.get("engines"))


def tensorrt_engines_for(onnx_dir: str | Path, engine_dir: str | Path, settings: dict, trt_version: str) -> Path:
    """``engine_dir`` holding engines for the export in ``onnx_dir``: cached, or built now (logged)."""
    engine_dir = Path(engine_dir)
    if cached_engines(engine_dir, onnx_dir, settings, trt_version):
        log.info("using the cached TensorRT engines in %s", engine_dir)
        return engine_dir
    log.warning("building TensorRT engines for %s now (settings %s); cached in %s", onnx_dir, settings, engine_dir)
    from surgery_r1_ros.export.tensorrt_build import BuildSettings, build_engines

    build_engines(onnx_dir, engine_dir, BuildSettings(**settings))
    return engine_dir
