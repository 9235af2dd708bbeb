"""``surgery-r1 export ...``: ONNX export with a parity check, and TensorRT engines built from it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="export the model to ONNX, build TensorRT engines")
    sub = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")

    onnx = sub.add_parser(
        "onnx", help="vision encoder + text decoder with past key/values (LoRA merged), then a parity check"
    )
    onnx.add_argument("--model", type=Path, default=None, help="model folder or LoRA adapter (default: built-in)")
    onnx.add_argument("--out", type=Path, required=True, help="output folder for the .onnx files and manifest")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument("--no-parity", dest="parity", action="store_false", help="skip the parity check against torch")
    onnx.add_argument("--parity-images", type=int, default=2, help="images in the parity check")
    onnx.add_argument("--parity-tokens", type=int, default=16, help="greedy tokens compared per question")
    onnx.set_defaults(handler=_onnx)

    trt = sub.add_parser("tensorrt", help="TensorRT engines from an ONNX export (needs tensorrt and a CUDA GPU)")
    trt.add_argument("--onnx", type=Path, required=True, help="folder written by `surgery-r1 export onnx`")
    trt.add_argument("--out", type=Path, required=True, help="folder for the engines, timing cache and manifest")
    precision = trt.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="fp16 (default)")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="bf16 (TensorRT 9+)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="fp32 only")
    trt.set_defaults(precision="fp16")
    trt.add_argument("--max-new-tokens", type=int, default=256, help="longest answer the decode profile holds")
    trt.add_argument("--max-question-tokens", type=int, default=96, help="longest question suffix in tokens")
    trt.add_argument("--workspace-gb", type=float, default=8.0)
    trt.add_argument(
        "--dry-run", action="store_true", help="print engine names (cache keys) and profiles; needs no TensorRT"
    )
    trt.set_defaults(handler=_tensorrt)


def _onnx(args: argparse.Namespace) -> int:
    from surgery_r1_ros.export.onnx_export import export_onnx

    manifest = export_onnx(args.model, args.out, opset=args.opset)
    print(f"exported {manifest['files']['vision']} and {manifest['files']['decoder']} to {args.out} "
          f"(image {manifest['image_size'][0]}x{manifest['image_size'][1]}, {manifest['num_image_tokens']} image "
          f"tokens, opset {manifest['opset']}, {manifest['export_seconds']} s)")  # fmt: skip
    if not args.parity:
        return 0
    from surgery_r1_ros.export.parity import check_parity

    result = check_parity(args.out, args.model, images=args.parity_images, max_new_tokens=args.parity_tokens)
    print(
        f"parity: max |logit diff| {result['max_abs_logit_diff']:.3g}, max |image embeds diff| "
        f"{result['max_abs_image_embeds_diff']:.3g}, identical greedy answers (onnxruntime = torch backend = "
        f"HF generate): {result['answers_identical']} over {len(result['cases'])} cases -> "
        f"{'PASSED' if result['passed'] else 'FAILED'} (tolerance {result['tolerance']})"
    )
    return 0 if result["passed"] else 1


def _tensorrt(args: argparse.Namespace) -> int:
    from surgery_r1_ros.export.tensorrt_build import BuildSettings, build_engines, plan_engines

    settings = BuildSettings(
        precision=args.precision,
        max_new_tokens=args.max_new_tokens,
        max_question_tokens=args.max_question_tokens,
        workspace_gb=args.workspace_gb,
    )
    if args.dry_run:
        try:
            from surgery_r1_ros.export.tensorrt_build import import_tensorrt

            version = import_tensorrt().__version__
        except RuntimeError:
            version = "not-installed"
        print(json.dumps(plan_engines(args.onnx, settings, version), indent=2))
        return 0
    manifest = build_engines(args.onnx, args.out, settings)
    for part, entry in manifest["engines"].items():
        print(f"{part}: {args.out / entry['engine']}")
    print(f"TensorRT {manifest['tensorrt_version']}, {settings.precision}, {manifest['build_seconds']} s")
    return 0
