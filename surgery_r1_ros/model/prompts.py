"""Model inputs from images, questions and prompt modes; with targets, the labels training learns from.

Training (teacher-forced SFT), evaluation and the runtime all build prompts here, through
``protocol.build_messages`` and the processor's chat template, so the three see identical token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from surgery_r1_ros.protocol import PromptMode, build_messages

IGNORE_INDEX = -100
IM_END = "<|im_end|>"

ImageLike = np.ndarray | Image.Image


def prompt_texts(processor, questions: Sequence[str], modes: Sequence[PromptMode | str]) -> list[str]:
    """Chat-template text of each prompt, ending with the assistant turn's opening."""
    return [
        processor.apply_chat_template(build_messages(q, PromptMode(m)), add_generation_prompt=True, tokenize=False)
        for q, m in zip(questions, modes, strict=True)
    ]


def encode_prompt(
    processor,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    modes: Sequence[PromptMode | str] | PromptMode | str,
    targets: Sequence[str] | None = None,
    *,
    padding_side: str | None = None,
) -> BatchFeature:
    """Tokenize a batch of (image, question, mode) prompts into model inputs.

    Returns input_ids, attention_mask, mm_token_type_ids, pixel_values and image_grid_thw (torch tensors).
    With ``targets`` each sequence is prompt + target + <|im_end|>, and ``labels`` equal input_ids on the
    target and <|im_end|> tokens and -100 everywhere else (prompt, image tokens, padding). Padding goes on
    the right when there are targets (training) and on the left otherwise (batched generation).
    """
    if isinstance(images, (np.ndarray, Image.Image)):
        images = [images]
    if isinstance(questions, str):
        questions = [questions]
    if isinstance(modes, (str, PromptMode)):
        modes = [modes] * len(questions)
    if not (len(images) == len(questions) == len(modes)):
        raise ValueError(
            f"need one image, question and mode per prompt; got {len(images)}, {len(questions)}, {len(modes)}"
        )
    if targets is not None and len(targets) != len(questions):
        raise ValueError(f"need one target per prompt; got {len(targets)} targets for {len(questions)} prompts")
    prompts = prompt_texts(processor, questions, modes)
    side = padding_side or ("right" if targets is not None else "left")
    tokenizer = processor.tokenizer
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        texts = prompts if targets is None else [p + t + IM_END for p, t in zip(prompts, targets, strict=True)]
        batch = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        if targets is None:
            return batch
        prompt_ids = _prompt_ids(processor, prompts, batch["image_grid_thw"])
    finally:
        tokenizer.padding_side = previous_side
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True)):
        positions = mask.nonzero().flatten()
        start, end = int(positions[0]), int(positions[-1]) + 1
        seq = ids[start:end].tolist()
        n_prompt = len(prompt_ids[row])
        if seq[:n_prompt] != list(prompt_ids[row]):  # a merge across the prompt/target boundary: keep what matches
            n_prompt = next(i for i, (a, b) in enumerate(zip(seq, prompt_ids[row], strict=False)) if a != b)
        labels[row, start + n_prompt : end] = ids[start + n_prompt : end]
    batch["labels"] = labels
    return batch


def _prompt_ids(processor, prompts: Sequence[str], image_grid_thw: torch.Tensor) -> list[list[int]]:
    """Token ids of each prompt (one image each) with its image placeholder expanded to the image's token count,
    as the processor expands it. The tokenizer alone, not a second processor call: that one preprocessed every
    image again (the last-layer refit cached its 48,000 rows in 12.6 min with this, 15.6-16.4 min without)."""
    merge = processor.image_processor.merge_size**2
    token = processor.image_token
    expanded = [
        p.replace(token, token * (int(grid.prod()) // merge)) for p, grid in zip(prompts, image_grid_thw, strict=True)
    ]
    return processor.tokenizer(expanded)["input_ids"]
