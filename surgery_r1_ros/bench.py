"""``surgery-r1 bench``: latency of every available backend beside a naive baseline, same model, same run.

For each backend an ``Engine`` is opened on the model and, for every repeat and image, the frame is sent with
a first (direct) question, which pays preprocessing, vision encoding and the image-prefix prefill (the
frame-ahead work; ``cold_ask_direct_ms``), then every question is asked about the cached frame in both
modes: direct (``ask_direct_ms``, ``direct_tokens`` new tokens) and with reasoning (``ask_reasoning_ms``,
``reasoning_tokens``). Those warm asks are what a user waits for when frames are encoded as they arrive.

The naive baseline is Hugging Face ``generate`` on the full image prompt for every question (processor,
vision tower, whole-prompt prefill and decoding each time) with the same ``max_new_tokens``. With
``fixed_length`` (default) every answer has exactly that many tokens: the engine ignores stop tokens and
``generate`` gets ``min_new_tokens = max_new_tokens``, because an untrained model does not stop and a fair
comparison needs equal work. The headline is the naive p50 over the engine p50 (``speedup_vs_naive``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_QUESTIONS = ("What is the state of bipolar_forceps?", "Where is suction located?")
FRAME_METRICS = ("preprocess_ms", "vision_encode_ms", "prefix_prefill_ms", "cold_ask_direct_ms")
PREPROCESS_FRAMES = 100  # frames timed for "preprocess_new_frame_ms"
ASK_METRICS = ("question_prefill_ms", "decode_ms_per_token", "ask_direct_ms", "ask_reasoning_ms")
NAIVE_METRICS = ("ask_direct_ms", "ask_reasoning_ms")
TABLE_ROWS = (
    ("preprocess_new_frame_ms", "preprocess, frame just arrived (ms)"),
    ("preprocess_ms", "preprocess, after a model call (ms)"),
    ("vision_encode_ms", "vision encode (ms)"),
    ("prefix_prefill_ms", "image prefix prefill (ms)"),
    ("question_prefill_ms", "question prefill (ms)"),
    ("decode_ms_per_token", "decode (ms/token)"),
    ("ask_direct_ms", "ask direct (ms)"),
    ("ask_reasoning_ms", "ask reasoning (ms)"),
    ("cold_ask_direct_ms", "frame + ask direct (ms)"),
)


@dataclass
class BenchSettings:
    images: int = 2
    questions: tuple[str, ...] = DEFAULT_QUESTIONS
    repeats: int = 2
    warmup: int = 1
    direct_tokens: int = 24
    reasoning_tokens: int = 128
    fixed_length: bool = True
    naive: bool = True
    device: str | None = None
    dtype: str | None = None
    image_size: tuple[int, int] = (1280, 1024)  # camera frames (w, h), resized by the processor
    threads: int | None = None  # CPU threads for torch and onnxruntime (default: theirs)
    backend_options: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images < 1 or self.repeats < 1 or self.warmup < 0 or not self.questions:
            raise ValueError("bench needs at least one image, one question and one repeat (warmup >= 0)")
        if self.direct_tokens < 1 or self.reasoning_tokens < 1:
            raise ValueError("direct_tokens and reasoning_tokens must be at least 1")


def stats(samples: Sequence[float]) -> dict:
    """p50 (median) and p95 of a list of milliseconds."""
    values = np.asarray(list(samples), dtype=float)
    if values.size == 0:
        return {"p50": None, "p95": None, "n": 0}
    return {
        "p50": round(float(np.percentile(values, 50)), 3),
        "p95": round(float(np.percentile(values, 95)), 3),
        "mean": round(float(values.mean()), 3),
        "n": int(values.size),
    }


def synthetic_images(count: int, size: tuple[int, int] = (320, 256), seed: int = 0) -> list[np.ndarray]:
    """Deterministic RGB frames (w, h): smooth colour fields plus noise, not the model's input size."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    images = []
    for _ in range(count):
        base = rng.uniform(40, 215, 3)
        slope = rng.uniform(-0.4, 0.4, (2, 3))
        img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 25, (h, w, 3))
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def bench_images(settings: BenchSettings, seed: int = 0) -> list[np.ndarray]:
    """Synthetic camera frames (the same for every backend and the baseline)."""
    return synthetic_images(settings.images, settings.image_size, seed=seed)


def _sync(device: str | None) -> None:
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bench_backend(name: str, model: Any, settings: BenchSettings, images: list[np.ndarray],
                  progress: Callable[[str], None]) -> dict:  # fmt: skip
    """Time one backend through the Engine; returns stats per metric (or the reason it is unavailable)."""
    from surgery_r1_ros.engine import Engine

    options = dict(settings.backend_options.get(name, {}))
    if name == "onnxruntime" and settings.threads:
        options.setdefault("threads", settings.threads)
    start = time.perf_counter()
    try:
        engine = Engine(model, backend=name, device=settings.device, dtype=settings.dtype, cache_size=2, **options)
    except Exception as err:  # a backend missing its runtime (tensorrt here) is reported, not fatal
        progress(f"{name}: not available ({type(err).__name__}: {str(err)[:200]})")
        return {"available": False, "error": f"{type(err).__name__}: {err}"}
    setup_s = time.perf_counter() - start
    if settings.fixed_length:
        engine.stop_ids = ()  # every answer gets exactly max_new_tokens tokens (see module docstring)
    samples: dict[str, list[float]] = {k: [] for k in FRAME_METRICS + ASK_METRICS}
    new_tokens: dict[str, list[int]] = {"direct": [], "reasoning": []}
    limits = {False: settings.direct_tokens, True: settings.reasoning_tokens}
    try:
        for w in range(settings.warmup):
            stamp = ("warmup", w)
            engine.ask(settings.questions[0], image=images[0], stamp=stamp, max_new_tokens=settings.direct_tokens)
            for reasoning in (False, True):
                engine.ask(settings.questions[0], stamp=stamp, reasoning=reasoning, max_new_tokens=limits[reasoning])
        for r in range(settings.repeats):
            for i, image in enumerate(images):
                stamp = ("bench", r, i)
                first = engine.ask(settings.questions[0], image=image, stamp=stamp,
                                   max_new_tokens=settings.direct_tokens)  # fmt: skip
                for key in FRAME_METRICS[:3]:
                    samples[key].append(first.timings.get(key, 0.0))
                samples["cold_ask_direct_ms"].append(first.latency_ms)
                for question in settings.questions:
                    for reasoning in (False, True):
                        answer = engine.ask(question, stamp=stamp, reasoning=reasoning,
                                            max_new_tokens=limits[reasoning])  # fmt: skip
                        mode = "reasoning" if reasoning else "direct"
                        samples[f"ask_{mode}_ms"].append(answer.latency_ms)
                        samples["question_prefill_ms"].append(answer.timings.get("prefill_ms", 0.0))
                        if answer.new_tokens > 1:
                            samples["decode_ms_per_token"].append(answer.timings.get("decode_ms_per_token", 0.0))
                        new_tokens[mode].append(answer.new_tokens)
            progress(f"{name}: repeat {r + 1}/{settings.repeats} done")
        samples["preprocess_new_frame_ms"] = time_preprocessing(engine.processor, images)
        info = {
            "available": True,
            "device": str(getattr(engine.backend, "device", settings.device)),
            "setup_s": round(setup_s, 2),
            "new_tokens": {k: sorted(set(v)) for k, v in new_tokens.items()},
            "stats": {k: stats(v) for k, v in samples.items()},
        }
        providers = getattr(engine.backend, "active_providers", None)
        if providers:
            info["providers"] = list(providers)
        return info
    finally:
        engine.close()


def time_preprocessing(processor: Any, images: list[np.ndarray], frames: int = PREPROCESS_FRAMES) -> list[float]:
    """Milliseconds from a camera frame to ``pixel_values`` as the engine makes them (kept buffers), each frame
    copied into a new array just before, as the middleware writes every message. The engine's own
    ``preprocess_ms`` comes right after a model call, whose weights have pushed the buffers out of the CPU
    caches: both are reported."""
    from surgery_r1_ros.model.processor import PixelValues

    make = PixelValues(processor, reuse_buffers=True)
    make(images[0])  # buffers allocated once, as in a running engine
    times = []
    for i in range(frames):
        frame = images[i % len(images)].copy()
        start = time.perf_counter()
        make(frame)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def bench_naive(model: Any, settings: BenchSettings, images: list[np.ndarray],
                progress: Callable[[str], None]) -> dict:  # fmt: skip
    """Hugging Face ``generate`` on the full image prompt for every question (the baseline)."""
    import torch

    from surgery_r1_ros.model import LoadedModel, encode_prompt, load_model
    from surgery_r1_ros.protocol import PromptMode

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")  # where the torch backend runs
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=settings.dtype)
    hf, processor = loaded.model.eval(), loaded.processor
    device = str(hf.device)
    limits = {PromptMode.GROUND: settings.direct_tokens, PromptMode.REASON: settings.reasoning_tokens}

    @torch.inference_mode()
    def ask(image: np.ndarray, question: str, mode: PromptMode) -> tuple[float, int]:
        start = time.perf_counter()
        inputs = encode_prompt(processor, [image], [question], mode).to(hf.device)
        n = limits[mode]
        extra = {"min_new_tokens": n} if settings.fixed_length else {}
        out = hf.generate(**inputs, max_new_tokens=n, do_sample=False, **extra)
        generated = out.shape[1] - inputs["input_ids"].shape[1]
        processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        _sync(device)
        return (time.perf_counter() - start) * 1000.0, int(generated)

    samples: dict[str, list[float]] = {k: [] for k in NAIVE_METRICS}
    new_tokens: dict[str, list[int]] = {"direct": [], "reasoning": []}
    for _ in range(settings.warmup):
        for mode in limits:
            ask(images[0], settings.questions[0], mode)
    for r in range(settings.repeats):
        for image in images:
            for question in settings.questions:
                for mode, key in ((PromptMode.GROUND, "direct"), (PromptMode.REASON, "reasoning")):
                    ms, n = ask(image, question, mode)
                    samples[f"ask_{key}_ms"].append(ms)
                    new_tokens[key].append(n)
        progress(f"naive: repeat {r + 1}/{settings.repeats} done")
    return {
        "available": True,
        "device": device,
        "method": "transformers generate() on the full image prompt for every question (image encoded every time)",
        "new_tokens": {k: sorted(set(v)) for k, v in new_tokens.items()},
        "stats": {k: stats(v) for k, v in samples.items()},
    }


def machine_info() -> dict:
    import torch
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    return info


def model_info(model: Any) -> dict:
    from surgery_r1_ros.model import BUILTIN_MODEL_DIR, LoadedModel

    if isinstance(model, LoadedModel):
        params = sum(p.numel() for p in model.model.parameters())
        from surgery_r1_ros.model import image_size

        return {"path": str(model.path) if model.path else None, "parameters": params,
                "dtype": str(model.model.dtype).replace("torch.", ""), "image_size": list(image_size(model.processor)),
                "info": model.info}  # fmt: skip
    folder = Path(model) if model is not None else BUILTIN_MODEL_DIR
    out: dict[str, Any] = {"path": str(folder), "builtin": folder.resolve() == BUILTIN_MODEL_DIR.resolve()}
    meta = folder / "surgery_r1.json"
    if meta.is_file():
        out["info"] = json.loads(meta.read_text())
    return out


def run_bench(model: Any = None, backends: Sequence[str] | None = None, settings: BenchSettings | None = None,
              progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Benchmark ``backends`` (default: every registered one) and the naive baseline on ``model``."""
    from surgery_r1_ros.engine import available_backends

    settings = settings or BenchSettings()
    progress = progress or (lambda text: log.info("%s", text))
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    names = list(backends) if backends else available_backends()
    images = bench_images(settings)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "kind": "surgery_r1_bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "model": model_info(model),
        "settings": {k: v for k, v in asdict(settings).items() if k != "backend_options"},
        "fixed_output_length_note": (
            "every answer has exactly direct_tokens / reasoning_tokens new tokens: the engine ignores stop tokens "
            "and HF generate gets min_new_tokens = max_new_tokens (an untrained model does not stop)"
            if settings.fixed_length
            else "answers stop at <|im_end|>: token counts may differ between runs"
        ),
        "backends": {},
    }
    for name in names:
        progress(f"{name}: benchmarking")
        result["backends"][name] = bench_backend(name, model, settings, images, progress)
    if settings.naive:
        progress("naive: benchmarking")
        result["naive"] = bench_naive(model, settings, images, progress)
        for entry in result["backends"].values():
            if entry.get("available"):
                entry["speedup_vs_naive"] = speedups(entry["stats"], result["naive"]["stats"])
    result["headline"] = headline(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):  # other processes on the machine skew CPU numbers: say how busy it was
        result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return result


def speedups(engine_stats: dict, naive_stats: dict) -> dict:
    """naive p50 / engine p50 (warm frame), and against frame + ask for the direct mode."""

    def ratio(naive_key: str, engine_key: str) -> float | None:
        a, b = naive_stats.get(naive_key, {}).get("p50"), engine_stats.get(engine_key, {}).get("p50")
        return round(a / b, 2) if a and b else None

    return {
        "direct": ratio("ask_direct_ms", "ask_direct_ms"),
        "reasoning": ratio("ask_reasoning_ms", "ask_reasoning_ms"),
        "direct_including_frame_encode": ratio("ask_direct_ms", "cold_ask_direct_ms"),
    }


def headline(result: dict) -> dict:
    out = {}
    for name, entry in result["backends"].items():
        if entry.get("available") and "speedup_vs_naive" in entry:
            s = entry["stats"]
            out[name] = {
                "ask_direct_p50_ms": s["ask_direct_ms"]["p50"],
                "ask_reasoning_p50_ms": s["ask_reasoning_ms"]["p50"],
                "decode_ms_per_token_p50": s["decode_ms_per_token"]["p50"],
                **{f"speedup_{k}": v for k, v in entry["speedup_vs_naive"].items()},
            }
    return out


def format_table(result: dict) -> str:
    """Rows = metrics, columns = backends and the naive baseline; cells 'p50 / p95' in ms."""
    columns = [(n, e) for n, e in result["backends"].items() if e.get("available")]
    if "naive" in result:
        columns.append(("naive HF generate", result["naive"]))
    width = max([28] + [len(label) for _, label in TABLE_ROWS]) + 1
    header = "metric".ljust(width) + "".join(name.rjust(22) for name, _ in columns)
    lines = [header, "-" * len(header)]
    for key, label in TABLE_ROWS:
        cells = []
        for _, entry in columns:
            s = entry["stats"].get(key)
            cells.append((f"{s['p50']:.2f} / {s['p95']:.2f}" if s and s["p50"] is not None else "-").rjust(22))
        lines.append(label.ljust(width) + "".join(cells))
    for name, entry in result["backends"].items():
        if entry.get("available") and entry.get("speedup_vs_naive"):
            sp = entry["speedup_vs_naive"]
            lines.append(
                f"{name}: {sp['direct']}x faster than naive (direct), {sp['reasoning']}x (reasoning), "
                f"{sp['direct_including_frame_encode']}x (direct, frame encode included)"
            )
        elif not entry.get("available"):
            lines.append(f"{name}: not available: {entry['error'][:150]}")
    settings = result["settings"]
    lines.append(
        f"p50 / p95 over {settings['repeats']} repeats x {settings['images']} images x {len(settings['questions'])} "
        f"questions; {settings['direct_tokens']} / {settings['reasoning_tokens']} new tokens (direct / reasoning)"
        + (", fixed output length" if settings["fixed_length"] else "")
    )
    return "\n".join(lines)


def write_result(result: dict, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


# --------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="latency of every available backend vs a naive HF generate baseline")
    bench.add_argument("--model", type=Path, default=None, help="model folder (default: the built-in model)")
    bench.add_argument("--backends", nargs="+", default=None, help="backends to time (default: every registered one)")
    bench.add_argument("--out", type=Path, required=True, help="JSON file for the numbers")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the backend's)")
    bench.add_argument("--images", type=int, default=2, help="different frames per repeat")
    bench.add_argument("--questions", nargs="+", default=list(DEFAULT_QUESTIONS))
    bench.add_argument("--repeats", type=int, default=2)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--direct-tokens", type=int, default=24, help="new tokens per direct answer")
    bench.add_argument("--reasoning-tokens", type=int, default=128, help="new tokens per reasoning answer")
    bench.add_argument("--natural-length", dest="fixed_length", action="store_false",
                       help="stop answers at <|im_end|> instead of fixing their length")  # fmt: skip
    bench.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive baseline")
    bench.add_argument("--onnx-dir", type=Path, default=None, help="ONNX export for the onnxruntime backend")
    bench.add_argument("--providers", default=None, help="onnxruntime execution providers, comma-separated")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    ort_options = {}
    if args.onnx_dir is not None:
        ort_options["onnx_dir"] = args.onnx_dir
    if args.providers:
        ort_options["providers"] = args.providers
    settings = BenchSettings(
        images=args.images,
        questions=tuple(args.questions),
        repeats=args.repeats,
        warmup=args.warmup,
        direct_tokens=args.direct_tokens,
        reasoning_tokens=args.reasoning_tokens,
        fixed_length=args.fixed_length,
        naive=args.naive,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        backend_options={"onnxruntime": ort_options} if ort_options else {},
    )
    result = run_bench(args.model, args.backends, settings, progress=lambda text: print(text, flush=True))
    result["command"] = "surgery-r1 " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv else None
    write_result(result, args.out)
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0
