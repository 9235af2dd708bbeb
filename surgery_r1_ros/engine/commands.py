"""``surgery-r1 ask``: one grounded answer about one image file, printed as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    ask = subparsers.add_parser("ask", help="answer a question about an image file (JSON: answer, box, reasoning)")
    ask.add_argument("--image", type=Path, required=True, help="image file (PNG/JPEG), any size up to 4096 px a side")
    ask.add_argument("--question", required=True, help='e.g. "Where is bipolar_forceps located?"')
    ask.add_argument("--reasoning", action="store_true", help="think first (slower); default: direct answer and box")
    ask.add_argument("--model", type=Path, default=None, help="model folder (default: the built-in model)")
    ask.add_argument(
        "--backend", default="torch", help="torch, onnxruntime, tensorrt, auto or package.module:Class (default: torch)"
    )
    ask.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    ask.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens")
    ask.add_argument(
        "--threads", type=int, default=None, help="CPU threads of the backend (default: 1 for a small model on CPU)"
    )
    ask.set_defaults(handler=_ask)


def read_image(path: Path):
    """Read an image file as an RGB uint8 array, with a clear error when it is missing or unreadable."""
    import cv2

    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read {path} as an image; use a PNG or JPEG file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _ask(args: argparse.Namespace) -> int:
    from surgery_r1_ros.engine import open_engine

    image = read_image(args.image)
    options = {} if args.threads is None else {"threads": args.threads}
    engine = open_engine(args.model, args.backend, args.device, **options)
    try:
        answer = engine.ask(args.question, image=image, reasoning=args.reasoning, max_new_tokens=args.max_new_tokens)
    finally:
        engine.close()
    out = answer.to_dict()
    keys = ("answer", "reasoning", "box", "coherent", "latency_ms", "timings")
    ordered = {k: out[k] for k in keys} | {k: v for k, v in out.items() if k not in keys}
    print(json.dumps(ordered, indent=2))
    return 0
