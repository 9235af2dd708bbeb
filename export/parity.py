"""Parity of an ONNX export with the PyTorch model it came from.

Three checks on a few images x questions x prompt modes (direct and reasoning):

1. ``max_abs_image_embeds_diff``: vision.onnx against the torch vision tower.
2. ``max_abs_logit_diff``: the onnxruntime backend's last-position logits after the question and after each
   generated token (frame-ahead path: vision, image prefix prefill, question prefill, past key/values)
   against one plain Hugging Face forward pass over the whole prompt + answer (image every time).
3. ``answers_identical``: greedy token ids from the onnxruntime backend, from the torch backend and from
   Hugging Face ``generate`` on the full prompt are the same.

The result is written into the export's manifest under ``"parity"`` and returned.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from surgery_r1_ros.bench import synthetic_images
from surgery_r1_ros.protocol import PromptMode

log = logging.getLogger(__name__)

DEFAULT_QUESTIONS = ("What organ is being operated?", "Where is bipolar_forceps located?")
DEFAULT_MODES = (PromptMode.GROUND, PromptMode.REASON)
# float32 on both sides: differences are rounding (~1e-6); a broken graph differs by whole units.
DEFAULT_TOLERANCE = 1e-3


def check_parity(
    onnx_dir: str | Path,
    model=None,
    *,
    images: int = 2,
    questions: tuple[str, ...] = DEFAULT_QUESTIONS,
    modes: tuple[PromptMode, ...] = DEFAULT_MODES,
    max_new_tokens: int = 16,
    tolerance: float = DEFAULT_TOLERANCE,
    write: bool = True,
) -> dict:
    """Compare the export in ``onnx_dir`` with ``model`` (folder, LoadedModel or None = the manifest's model)."""
    from surgery_r1_ros.export.onnx_export import VisionEncoder, load_for_export

    from surgery_r1_ros.engine.artifacts import load_manifest, write_manifest
    from surgery_r1_ros.engine.decode import generate
    from surgery_r1_ros.engine.engine import Engine
    from surgery_r1_ros.model import LoadedModel

    start = time.perf_counter()
    onnx_dir = Path(onnx_dir)
    manifest = load_manifest(onnx_dir)
    if model is None:
        model = manifest.get("model_dir")
    loaded = model if isinstance(model, LoadedModel) else load_for_export(model, attn_implementation="sdpa")
    hf = loaded.model.float().eval()
    torch_engine = Engine(loaded, backend="torch", device="cpu")
    ort_engine = Engine(onnx_dir, backend="onnxruntime", device="cpu")
    ort = ort_engine.backend
    image_token = int(hf.config.image_token_id)
    vision = VisionEncoder(hf, torch.tensor(manifest["image_grid_thw"])).eval()

    embeds_diff = 0.0
    logit_diff = 0.0
    cases = []
    for i, image in enumerate(synthetic_images(images)):
        features = torch_engine.processor.image_processor(
            images=[image], input_data_format="channels_last", return_tensors="pt"
        )
        pixels, grid = features["pixel_values"].float(), features["image_grid_thw"][0]
        with torch.no_grad():
            torch_embeds = vision(pixels).numpy()
        onnx_embeds = ort.vision.run(["image_embeds"], {"pixel_values": pixels.numpy()})[0]
        embeds_diff = max(embeds_diff, float(np.abs(torch_embeds - onnx_embeds).max()))
        engines = {"torch": torch_engine, "onnxruntime": ort_engine}
        for engine in engines.values():
            engine.encode(image, stamp=("parity", i))
        frames = {name: engine.frame_state(("parity", i)) for name, engine in engines.items()}
        for question in questions:
            for mode in modes:
                suffix = torch_engine.suffix_ids(question, mode)
                prompt = torch_engine.prompt_ids(question, mode)
                if ort_engine.prompt_ids(question, mode) != prompt:
                    raise RuntimeError("the export's processor tokenizes prompts differently from the model's")
                stops = torch_engine.stop_ids
                ort_tokens = generate(ort, frames["onnxruntime"], suffix, max_new_tokens, stops).tokens
                torch_tokens = generate(torch_engine.backend, frames["torch"], suffix, max_new_tokens, stops).tokens
                hf_tokens = _hf_generate(hf, prompt, pixels, grid, image_token, max_new_tokens, stops)
                # Logits along the torch answer: one full forward pass vs the frame-ahead ONNX path.
                ref = _hf_logits(hf, prompt, torch_tokens, pixels, grid, image_token)
                got = np.concatenate(ort.logits(frames["onnxruntime"], suffix, torch_tokens[:-1]), axis=0)
                diff = float(np.abs(ref - got).max())
                logit_diff = max(logit_diff, diff)
                cases.append({
                    "image": i,
                    "question": question,
                    "mode": PromptMode(mode).value,
                    "new_tokens": len(ort_tokens),
                    "max_abs_logit_diff": diff,
                    "onnxruntime_equals_torch": ort_tokens == torch_tokens,
                    "onnxruntime_equals_hf_generate": ort_tokens == hf_tokens,
                    "text": ort_engine.processor.tokenizer.decode(ort_tokens, skip_special_tokens=True)[:120],
                })  # fmt: skip
    identical = all(c["onnxruntime_equals_torch"] and c["onnxruntime_equals_hf_generate"] for c in cases)
    result = {
        "passed": bool(identical and logit_diff <= tolerance and embeds_diff <= tolerance),
        "tolerance": tolerance,
        "max_abs_logit_diff": logit_diff,
        "max_abs_image_embeds_diff": embeds_diff,
        "answers_identical": identical,
        "distinct_answers": len({c["text"] for c in cases}),
        "cases": cases,
        "providers": list(ort.active_providers),
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.perf_counter() - start, 2),
    }
    torch_engine.close()
    ort_engine.close()
    if write:
        manifest = load_manifest(onnx_dir)
        manifest["parity"] = {k: v for k, v in result.items() if k != "cases"}
        write_manifest(onnx_dir, manifest)
    log.info(
        "parity: max |logit diff| %.3g, max |image embeds diff| %.3g, identical greedy answers: %s (%d cases)",
        logit_diff, embeds_diff, identical, len(cases),
    )  # fmt: skip
    return result


def _hf_inputs(ids: list[int], pixels: torch.Tensor, grid: torch.Tensor, image_token: int) -> dict:
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == image_token).long(),
        "pixel_values": pixels,
        "image_grid_thw": grid.reshape(1, 3),
    }


@torch.no_grad()
def _hf_generate(hf, prompt, pixels, grid, image_token, max_new_tokens, stops) -> list[int]:
    out = hf.generate(
        **_hf_inputs(prompt, pixels, grid, image_token),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stops),
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def _hf_logits(hf, prompt, answer, pixels, grid, image_token) -> np.ndarray:
    ids = list(prompt) + list(answer[:-1])
    logits = hf(**_hf_inputs(ids, pixels, grid, image_token)).logits[0]
    return logits[len(prompt) - 1 :].float().numpy()
