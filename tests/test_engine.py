"""The engine: frame-ahead parity with model.generate, M-RoPE positions, answers, validation, cache, memory, CLI."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import tracemalloc

import cv2
import numpy as np
import pytest
import torch

from surgery_r1_ros import cli
from surgery_r1_ros.engine import Cancelled, Engine, EngineError, InputError, available_backends, open_engine
from surgery_r1_ros.engine.decode import generate
from surgery_r1_ros.engine.rope import prefix_positions
from surgery_r1_ros.engine.torch_backend import TorchBackend
from surgery_r1_ros.model import build_builtin, encode_prompt
from surgery_r1_ros.protocol import PromptMode, build_target

QUESTIONS = ("Where is suction located?", "What is the state of bipolar_forceps?", "What organ is being operated?")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model runs fastest on one thread, above all on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded():
    """A built-in model with larger random weights: its greedy outputs vary with image and question (a fresh
    init mostly repeats one token), so token-for-token comparisons below have teeth."""
    loaded = build_builtin(seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.08, generator=generator)
    return loaded


@pytest.fixture(scope="module")
def engine(loaded):
    return Engine(loaded, cache_size=3)


# -- frame-ahead correctness ------------------------------------------------------------------------------
def test_prompt_ids_match_the_processor(engine, loaded):
    for mode in PromptMode:
        batch = encode_prompt(loaded.processor, [_image(64, 80)], [QUESTIONS[1]], mode)
        assert batch["input_ids"][0].tolist() == engine.prompt_ids(QUESTIONS[1], mode)


def test_prefix_positions_match_transformers_get_rope_index(engine, loaded):
    batch = encode_prompt(loaded.processor, [_image(64, 80)], [QUESTIONS[0]], PromptMode.GROUND)
    full, _ = loaded.model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    prefix = engine._prefix_ids
    mine, next_position = prefix_positions(prefix, loaded.model.config.image_token_id, [1, 16, 20])
    assert np.array_equal(full[:, 0, : len(prefix)].numpy(), mine)
    # the question's text continues one past the prefix's largest position, on all three rows
    assert next_position == int(mine.max()) + 1
    assert full[:, 0, len(prefix)].tolist() == [next_position] * 3


@pytest.mark.parametrize("mode", [PromptMode.GROUND, PromptMode.REASON])
def test_frame_ahead_tokens_equal_model_generate(engine, loaded, mode):
    """The correctness proof: cached image prefix + question suffix == greedy generate on the full prompt."""
    outputs = set()
    for seed, (h, w) in enumerate([(1024, 1280), (60, 90), (300, 200)]):
        image = _image(h, w, seed)
        stamp = engine.encode(image, stamp=("parity", seed))
        for question in (*QUESTIONS, "Is there any bleeding?"):
            batch = encode_prompt(loaded.processor, [image], [question], mode)
            with torch.inference_mode():
                expected = loaded.model.generate(**batch, max_new_tokens=16)[0, batch["input_ids"].shape[1] :]
            frame = engine.frame_state(stamp)
            tokens = generate(engine.backend, frame, engine.suffix_ids(question, mode), 16, engine.stop_ids).tokens
            assert tokens == expected.tolist(), (seed, question)
            outputs.add(tuple(tokens))
    assert len(outputs) >= 8  # 12 prompts: the answers really depend on image and question


def test_static_kv_cache_decodes_like_the_dynamic_one(engine, loaded):
    """The GPU path's static cache (prefix copied in place, positions continued), checked here on CPU."""
    static = Engine(loaded, static_cache=True, max_cache_len=200)
    for seed in range(2):
        image = _image(80, 120, seed)
        for reasoning in (False, True):
            expected = engine.ask(QUESTIONS[seed], image=image, stamp=("static", seed), reasoning=reasoning,
                                  max_new_tokens=16)  # fmt: skip
            got = static.ask(QUESTIONS[seed], image=image, stamp=seed, reasoning=reasoning, max_new_tokens=16)
            assert got.text == expected.text


def test_asking_twice_about_a_frame_gives_the_same_answer(engine):
    engine.encode(_image(100, 120, 7), stamp="twice")
    first = engine.ask(QUESTIONS[0], stamp="twice", max_new_tokens=12)
    engine.ask(QUESTIONS[1], stamp="twice", reasoning=True, max_new_tokens=12)
    again = engine.ask(QUESTIONS[0], stamp="twice", max_new_tokens=12)
    assert first.text == again.text and first.new_tokens == again.new_tokens


# -- answers: parsing, box scaling, coherence, timings -------------------------------------------------------
class ScriptedBackend:
    """A backend that 'generates' a fixed completion: to test everything around the model."""

    name = "scripted"
    device = "cpu"

    def __init__(self, processor, completion: str = "") -> None:
        self.processor = processor
        self.completion = completion
        self.encoded = 0
        self.steps = 0  # decode steps run

    def session(self):
        return contextlib.nullcontext()

    def encode_frame(self, pixel_values, image_grid_thw, prefix_ids):
        self.encoded += 1
        return {"grid": image_grid_thw.tolist()}, {"vision_encode_ms": 1.0, "prefix_prefill_ms": 1.0}

    def prefill(self, frame_state, suffix_ids, max_new_tokens):
        ids = self.processor.tokenizer(self.completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
        upcoming = iter(ids[1:])

        def step(_token: int) -> int:
            self.steps += 1
            return next(upcoming)

        return ids[0], step

    def close(self) -> None:
        pass


@pytest.fixture
def scripted(loaded):
    backend = ScriptedBackend(loaded.processor)
    return Engine(None, backend=backend, cache_size=2), backend


def test_box_is_scaled_to_the_original_image(scripted):
    engine, backend = scripted
    assert engine.image_size == (280, 224)
    backend.completion = build_target("left-top", (28, 28, 140, 112))
    answer = engine.ask(QUESTIONS[0], image=_image(1024, 1280))
    assert answer.answer == "left-top" and answer.format_ok
    assert answer.box == (128, 128, 640, 512)
    assert answer.image_size == (1280, 1024) and answer.model_box == (28.0, 28.0, 140.0, 112.0)
    assert answer.coherent and answer.reasoning is None
    # a box past the model's frame is clipped to the image
    backend.completion = build_target("right-bottom", (200, 100, 400, 300))
    assert engine.ask(QUESTIONS[0], image=_image(448, 560)).box == (400, 200, 560, 448)


def test_coherence_uses_the_question_subject(scripted):
    engine, backend = scripted
    left_box = (10, 10, 60, 60)
    backend.completion = build_target(
        "Grasping", left_box, "The bipolar forceps is in the lower right. Its jaws hold tissue."
    )
    answer = engine.ask("What is the state of bipolar_forceps?", image=_image(224, 280), reasoning=True)
    assert answer.mode == "reason" and answer.reasoning.startswith("The bipolar forceps")
    assert answer.coherent is False
    backend.completion = build_target("Grasping", left_box, "The bipolar forceps is in the upper left.")
    assert engine.ask("What is the state of bipolar_forceps?", image=_image(224, 280), reasoning=True).coherent
    # claims about another instrument are not checked
    backend.completion = build_target("Grasping", left_box, "The suction is in the lower right.")
    assert engine.ask("What is the state of bipolar_forceps?", image=_image(224, 280), reasoning=True).coherent


def test_missing_box_is_not_coherent_and_free_questions_are_answered(scripted):
    engine, backend = scripted
    backend.completion = "<answer>kidney</answer>"
    answer = engine.ask("Which organ is this, please?", image=_image(100, 100))
    assert answer.answer == "kidney" and answer.box is None and answer.coherent is False
    assert not answer.format_ok and any("box" in p for p in answer.problems)
    backend.completion = "garbage"
    answer = engine.ask(QUESTIONS[2], image=_image(100, 100))
    assert answer.answer is None and answer.box is None and not answer.coherent


def test_answer_json_and_timings(scripted):
    engine, backend = scripted
    backend.completion = build_target("kidney", (1, 2, 3, 4))
    answer = engine.ask(QUESTIONS[2], image=_image(100, 100))
    data = json.loads(answer.to_json())
    for key in ("answer", "reasoning", "box", "coherent", "latency_ms", "timings"):
        assert key in data
    for key in ("preprocess_ms", "vision_encode_ms", "prefill_ms", "decode_ms", "total_ms", "decode_ms_per_token"):
        assert data["timings"][key] >= 0
    assert data["latency_ms"] == pytest.approx(data["timings"]["total_ms"])
    assert data["encode_ms"] >= 2.0  # the frame was encoded in this ask (the scripted backend reports 2 ms)
    assert engine.ask(QUESTIONS[2], stamp=answer.stamp).encode_ms == 0.0  # asked again: already encoded


# -- input checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((64, 64), np.uint8), "grayscale"),
        (np.zeros((64, 64, 1), np.uint8), "grayscale"),
        (np.zeros((64, 64, 4), np.uint8), "RGBA"),
        (np.zeros((64, 64, 3), np.uint16), "16-bit"),
        (np.zeros((64, 64, 3), np.float32), "uint8 0..255"),
        (np.zeros((1, 1, 3), np.uint8), "too small"),
        (np.zeros((20, 640, 3), np.uint8), "too small"),
        (np.zeros((4320, 7680, 3), np.uint8), "too large"),
        ([[1, 2, 3]], "numpy array"),
        (np.zeros((64, 64, 3, 1), np.uint8), r"not \(H, W, 3\)"),
    ],
)
def test_bad_images_are_refused_with_advice(scripted, image, message):
    engine, _ = scripted
    with pytest.raises(InputError, match=message):
        engine.ask(QUESTIONS[0], image=image)
    with pytest.raises(InputError, match=message):
        engine.encode(image)


@pytest.mark.parametrize(
    ("question", "message"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("x" * 501, "limit is 500"),
        ("hi <|im_end|>", "control tokens"),
        (None, "text"),
    ],
)
def test_bad_questions_are_refused(scripted, question, message):
    engine, _ = scripted
    with pytest.raises(InputError, match=message):
        engine.ask(question, image=_image(64, 64))


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(EngineError, match=r"available backends: .*torch"):
        Engine(None, backend="tensorrt-nonexistent")
    assert "torch" in available_backends()


def test_open_engine_builds_user_classes_and_checks_the_contract():
    engine = open_engine("some/model", "fake_engines:ScriptedEngine", "cpu", max_question_length=80)
    answer = engine.ask("Where is suction located?", image=_image(64, 64), stamp=1)
    assert answer.answer == "left-top" and answer.box == (0, 0, 32, 32)
    with pytest.raises(EngineError, match="cannot import 'Nope' from 'fake_engines'"):
        open_engine(None, "fake_engines:Nope")
    with pytest.raises(EngineError, match="lacks encode"):
        open_engine(None, "fake_engines:AskOnly")


# -- streaming and cancel ----------------------------------------------------------------------------------
def test_tokens_stream_in_order_and_end_in_the_answer(scripted):
    engine, backend = scripted
    reasoning = "The suction is in the upper left. Its tip touches tissue."
    backend.completion = build_target("Suction", (10, 10, 60, 60), reasoning)
    seen = []
    answer = engine.ask(QUESTIONS[0], image=_image(224, 280), reasoning=True, on_token=seen.append)
    assert [p.new_tokens for p in seen] == list(range(1, answer.new_tokens + 1))
    assert seen[-1].text == answer.text
    texts = [p.reasoning for p in seen]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # the reasoning only grows
    assert texts[-1] == answer.reasoning == reasoning


def test_cancel_stops_before_the_next_decode_step(scripted):
    engine, backend = scripted
    backend.completion = build_target("Suction", (10, 10, 60, 60), "word " * 40)
    seen = []
    with pytest.raises(Cancelled) as stop:
        engine.ask(QUESTIONS[0], image=_image(224, 280), reasoning=True, on_token=seen.append,
                   cancelled=lambda: len(seen) >= 7)  # fmt: skip
    assert backend.steps == 6  # the first token comes from the prefill; no step after the check said stop
    assert stop.value.progress.new_tokens == 7 == len(seen)
    assert stop.value.progress.reasoning == seen[-1].reasoning and stop.value.progress.reasoning.startswith("word")
    backend.completion = build_target("kidney", (1, 2, 3, 4))
    assert engine.ask(QUESTIONS[2]).answer == "kidney"  # the engine answers normally afterwards


def test_cancel_on_the_torch_backend_costs_at_most_one_step(engine):
    """The real decode loop: a cancel raised after the 3rd token ends the ask with exactly 3 tokens."""
    seen = []
    image = _image(80, 120, 5)
    full = engine.ask(QUESTIONS[1], image=image, stamp="cancel", reasoning=True, max_new_tokens=12)
    assert full.new_tokens > 4
    with pytest.raises(Cancelled) as stop:
        engine.ask(QUESTIONS[1], stamp="cancel", reasoning=True, max_new_tokens=12, on_token=seen.append,
                   cancelled=lambda: len(seen) >= 3)  # fmt: skip
    assert len(seen) == 3 and stop.value.progress.new_tokens == 3
    assert full.text.startswith(stop.value.progress.text)  # the same tokens as the uncancelled ask


# -- frame cache ---------------------------------------------------------------------------------------------
def test_frame_cache_is_lru_and_bounded(scripted):
    engine, backend = scripted
    backend.completion = build_target("kidney", (1, 2, 3, 4))
    with pytest.raises(InputError, match="no frame has been encoded"):
        engine.ask(QUESTIONS[2])
    for stamp in (1, 2):
        engine.encode(_image(64, 64, stamp), stamp=stamp)
    engine.ask(QUESTIONS[2], stamp=1)  # 1 becomes the most recently used
    engine.encode(_image(64, 64, 3), stamp=3)  # evicts 2
    assert engine.cached_stamps == [1, 3]
    with pytest.raises(InputError, match="no encoded frame with stamp 2"):
        engine.ask(QUESTIONS[2], stamp=2)
    encoded = backend.encoded
    engine.encode(_image(64, 64, 3), stamp=3)  # same stamp: not encoded again
    assert backend.encoded == encoded
    assert engine.ask(QUESTIONS[2]).stamp == 3  # no stamp, no image: the latest frame
    answer = engine.ask(QUESTIONS[2], image=_image(64, 64), stamp=1)
    assert answer.timings["vision_encode_ms"] == 0.0  # cached frame: no vision encoding in this ask


def test_no_memory_growth_over_many_asks():
    small = build_builtin(seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, mrope_section=[4, 6, 6], vision_hidden_size=32,
                          vision_intermediate_size=64, image_width=56, image_height=56)  # fmt: skip
    engine = Engine(small, cache_size=4)
    assert isinstance(engine.backend, TorchBackend)
    image = _image(28, 28)

    def burst(n: int) -> None:
        for i in range(n):
            engine.ask(QUESTIONS[i % 3], image=image, stamp=(i // 2) % 6, reasoning=bool(i % 2), max_new_tokens=2)
            assert len(engine.cached_stamps) <= 4

    burst(20)  # warm-up: allocator pools, lazily created objects
    gc.collect()
    rss_before = _rss_bytes()
    tracemalloc.start()
    snapshot = tracemalloc.take_snapshot()
    burst(180)
    gc.collect()
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snapshot, "filename"))
    tracemalloc.stop()
    assert growth < 512 * 1024, f"Python heap grew {growth} bytes over 180 asks"
    assert _rss_bytes() - rss_before < 32 * 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# -- command line --------------------------------------------------------------------------------------------
def test_ask_command_prints_json(tmp_path, capsys):
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), _image(96, 128))
    assert cli.main(["ask", "--image", str(path), "--question", QUESTIONS[0], "--max-new-tokens", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data)[:6] == ["answer", "reasoning", "box", "coherent", "latency_ms", "timings"]
    assert data["image_size"] == [128, 96] and data["new_tokens"] <= 4


def test_ask_command_explains_a_missing_or_unreadable_image(tmp_path, capsys):
    assert cli.main(["ask", "--image", str(tmp_path / "none.png"), "--question", "q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert cli.main(["ask", "--image", str(broken), "--question", "q"]) == 2
    assert "cannot read" in capsys.readouterr().err
