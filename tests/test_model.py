"""The model package: built-in model, tokenizer, fixed-size processor, prompts/labels and folder loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery_r1_ros.model import (
    BUILTIN_MODEL_DIR,
    IGNORE_INDEX,
    ModelLoadError,
    build_builtin,
    encode_prompt,
    image_size,
    image_token_count,
    load_model,
    save_model,
)
from surgery_r1_ros.model.tokenizer import SPECIAL_TOKENS, TAG_TOKENS
from surgery_r1_ros.protocol import PromptMode, build_target

QUESTION = "What is the state of bipolar_forceps?"


@pytest.fixture(scope="module")
def built():
    return build_builtin(["The bipolar forceps sits in the upper left."], image_mean=(0.6, 0.3, 0.3), seed=1)


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    return save_model(built, tmp_path_factory.mktemp("model") / "builtin", {"trained": False})


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_builtin_is_a_small_qwen2_5_vl(built):
    config = built.model.config
    assert type(built.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    text = config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert config.vision_config.out_hidden_size == text.hidden_size
    assert len(built.processor.tokenizer) <= text.vocab_size <= 4096
    assert sum(p.numel() for p in built.model.parameters()) < 10_000_000
    tok = built.processor.tokenizer
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    gen = built.model.generation_config
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen.pad_token_id is not None and gen.do_sample is False


def test_tokenizer_splits_digits_and_keeps_special_tokens(built):
    tok = built.processor.tokenizer
    for token in (*SPECIAL_TOKENS, *TAG_TOKENS):
        ids = tok(token, add_special_tokens=False).input_ids
        assert len(ids) == 1, token
    tokens = tok.convert_ids_to_tokens(tok("[1234,56,7,890]", add_special_tokens=False).input_ids)
    assert [t for t in tokens if t.isdigit()] == list("1234567890")
    target = build_target("Tissue_Manipulation", (12, 34, 200, 180))
    ids = tok(target, add_special_tokens=False).input_ids
    assert tok.decode(ids) == target
    assert len(ids) <= 30


@pytest.mark.parametrize("shape", [(1024, 1280), (64, 48), (300, 900)])
def test_processor_resizes_to_one_fixed_size(built, shape):
    processor = built.processor
    assert image_size(processor) == (280, 224)
    assert image_token_count(processor) == 80
    batch = encode_prompt(processor, [_image(*shape)], [QUESTION], PromptMode.GROUND)
    assert batch["image_grid_thw"].tolist() == [[1, 16, 20]]
    assert tuple(batch["pixel_values"].shape) == (320, 3 * 2 * 14 * 14)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_id).sum()) == 80
    assert batch["mm_token_type_ids"].sum().item() == 80


def test_numpy_pixel_values_equal_the_processors(built):
    """The fast path (training loader, runtime) and the processor give the same patches at the model's size,
    also when the runtime's buffers are written again by frames of other sizes."""
    from surgery_r1_ros.model.processor import PixelValues, pixel_values_from_array

    w, h = image_size(built.processor)
    image = _image(h, w, seed=3)
    reference = built.processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
    fast = pixel_values_from_array(image, built.processor)
    assert fast.shape == reference.shape == ((h // 14) * (w // 14), 3 * 2 * 14 * 14)
    np.testing.assert_allclose(fast, reference, atol=1e-5)
    # frames of other sizes are resized by the same function on both paths: still equal
    reused = PixelValues(built.processor, reuse_buffers=True)
    for seed, shape in enumerate(((1024, 1280), (64, 48), (300, 900), (1024, 1280), (h, w))):
        frame = _image(*shape, seed=4 + seed)
        processed = built.processor.image_processor(images=[frame], return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(pixel_values_from_array(frame, built.processor), processed, atol=1e-5)
        np.testing.assert_allclose(reused(frame), processed, atol=1e-5)
    with pytest.raises(ValueError, match="RGB uint8"):
        pixel_values_from_array(image[..., 0], built.processor)


def test_prompt_puts_the_image_before_the_question(built):
    batch = encode_prompt(built.processor, [_image(50, 60)], [QUESTION], PromptMode.REASON)
    text = built.processor.tokenizer.decode(batch["input_ids"][0])
    assert text.index("<|vision_end|>") < text.index(QUESTION)
    assert text.endswith("<|im_start|>assistant\n")
    assert "Think in <think>" in text


def test_encode_prompt_labels_only_the_target(built):
    targets = [
        build_target("left-top", (1, 2, 30, 40)),
        build_target("Grasping", (5, 6, 70, 80), "The bipolar forceps is in the upper left."),
    ]
    questions = ["Where is suction located?", QUESTION]
    batch = encode_prompt(
        built.processor, [_image(40, 50), _image(90, 30)], questions, [PromptMode.GROUND, PromptMode.REASON], targets
    )
    tok = built.processor.tokenizer
    assert batch["labels"].shape == batch["input_ids"].shape
    for row, target in enumerate(targets):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tok.decode(labelled) == target + "<|im_end|>"
        # labelled tokens are the last real tokens of the row (right padding)
        n_real = int(batch["attention_mask"][row].sum())
        assert batch["labels"][row][n_real - len(labelled) : n_real].tolist() == labelled.tolist()
    assert batch["attention_mask"][0, -1] == 1 or batch["attention_mask"][1, -1] == 1
    with torch.no_grad():
        loss = built.model(**batch).loss
    assert torch.isfinite(loss)


def test_encode_prompt_labels_the_target_with_images_of_several_token_counts(built):
    """Stock Qwen2.5-VL resizes each image to its own size (its own number of image tokens); the label mask still
    starts exactly where each row's target does."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from surgery_r1_ros.model.processor import SurgeryR1Processor

    dynamic = SurgeryR1Processor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64),
        tokenizer=built.processor.tokenizer,
        chat_template=built.processor.chat_template,
    )
    targets = [build_target("left-top", (1, 2, 30, 40)), build_target("Grasping", (5, 6, 70, 80), "It grips.")]
    batch = encode_prompt(
        dynamic, [_image(60, 60), _image(300, 120)], ["Where is suction located?", QUESTION], ["ground", "reason"],
        targets,
    )  # fmt: skip
    image_id = dynamic.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = (batch["input_ids"] == image_id).sum(1).tolist()
    assert counts[0] != counts[1]
    for row, target in enumerate(targets):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert dynamic.tokenizer.decode(labelled) == target + "<|im_end|>"


def test_prompts_without_targets_pad_left_for_generation(built):
    batch = encode_prompt(
        built.processor, [_image(40, 50), _image(40, 50)], ["Where is suction located?", QUESTION], "ground"
    )
    assert "labels" not in batch
    assert bool(batch["attention_mask"][:, -1].all())


def test_save_and_load_round_trip(built, saved):
    loaded = load_model(saved)
    assert loaded.path == saved and loaded.info["trained"] is False
    assert image_size(loaded.processor) == (280, 224)
    assert loaded.processor.image_processor.image_mean == built.processor.image_processor.image_mean
    batch = encode_prompt(built.processor, [_image(100, 120)], [QUESTION], PromptMode.GROUND)
    again = encode_prompt(loaded.processor, [_image(100, 120)], [QUESTION], PromptMode.GROUND)
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    with torch.no_grad():
        assert torch.allclose(built.model(**batch).logits, loaded.model(**again).logits, atol=1e-5)
        out = loaded.model.generate(**again, max_new_tokens=3)
    assert out.shape[1] <= again["input_ids"].shape[1] + 3


def test_shipped_builtin_model_loads():
    loaded = load_model()
    assert loaded.path == BUILTIN_MODEL_DIR
    width, height = image_size(loaded.processor)
    assert [width, height] == loaded.info["image_size"] and width % 28 == 0 and height % 28 == 0
    assert loaded.info["trained"] is True, "the shipped model is the trained one (make model), not a placeholder"
    size = sum(f.stat().st_size for f in BUILTIN_MODEL_DIR.iterdir())
    assert size < 30 * 2**20


def _broken_copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    return folder


def test_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist.*Qwen2\.5-VL"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "model.safetensors").unlink(), "no weights"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 100), "cannot load the weights"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
        (lambda f: (f / "preprocessor_config.json").unlink(), "preprocessor_config.json"),
    ],
)
def test_broken_folder_raises_model_load_error(saved, tmp_path, breakage, message):
    folder = _broken_copy(saved, tmp_path)
    breakage(folder)
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder)


def test_wrong_architecture_is_named(saved, tmp_path):
    folder = _broken_copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"'llama'.*needs a Qwen2\.5-VL"):
        load_model(folder)


def test_weights_of_another_size_are_rejected(saved, tmp_path):
    folder = _broken_copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_model(folder)
