"""Evaluation: scoring rules on hand-written completions, and the eval command on a tiny split."""

from __future__ import annotations

import json

import pytest
from surgery_r1_ros.training.evaluate import Item, score

from surgery_r1_ros.protocol import PromptMode
from surgery_r1_ros.scoring import NONE_LABEL

SIZE = (280, 224)  # model input = frame size here, so boxes need no scaling
ITEMS = [
    Item("a.png", SIZE, "Where is suction located?", "left-top", (20, 20, 100, 80), "suction"),
    Item("a.png", SIZE, "What is the state of suction?", "Suction", (20, 20, 100, 80), "suction"),
    Item("a.png", SIZE, "What organ is being operated?", "kidney", (0, 0, 280, 224), None),
]


def test_score_direct_mode():
    completions = [
        "<answer>left-top</answer><box>[20,20,100,80]</box>",  # right, exact box
        "<answer>Idle</answer><box>[20,20,60,80]</box>",  # wrong label, half box
        "<answer>kidney</answer>",  # right label, box missing
    ]
    report = score(ITEMS, completions, PromptMode.GROUND, SIZE)
    assert report["n"] == 3
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["miou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert report["format_rate"] == pytest.approx(2 / 3)
    assert report["coherence_rate"] is None  # not applicable without reasoning
    assert 0.0 <= report["miou_legacy"] <= 1.0
    for key in ("accuracy", "f_score", "miou_legacy", "miou", "coherence_rate", "format_rate", "n", "definitions"):
        assert key in report


def test_score_counts_unreadable_answers_as_wrong():
    report = score(ITEMS[:1], ["<answer>banana</answer>"], PromptMode.GROUND, SIZE)
    assert report["accuracy"] == 0.0 and report["miou"] == 0.0
    assert NONE_LABEL in report["confusion"]["labels"]


def test_score_scales_boxes_back_to_the_frame():
    frame = Item("b.png", (560, 448), "Where is suction located?", "left-top", (40, 40, 200, 160), "suction")
    report = score([frame], ["<answer>left-top</answer><box>[20,20,100,80]</box>"], PromptMode.GROUND, SIZE)
    assert report["miou"] == pytest.approx(1.0)


def test_coherence_rate_definition():
    completions = [
        # coherent: claim agrees with the box
        "<think>The suction is in the upper left.</think><answer>left-top</answer><box>[20,20,100,80]</box>",
        # incoherent: claim contradicts the box
        "<think>The suction is in the lower right.</think><answer>Suction</answer><box>[20,20,100,80]</box>",
        # no reasoning: outside the denominator
        "<answer>kidney</answer><box>[0,0,280,224]</box>",
    ]
    report = score(ITEMS, completions, PromptMode.REASON, SIZE)
    assert report["n_with_reasoning"] == 2
    assert report["coherence_rate"] == pytest.approx(0.5)
    assert report["claims_rate"] == pytest.approx(1.0)
    assert report["format_rate"] == pytest.approx(2 / 3)


def test_reasoning_without_box_is_incoherent():
    text = "<think>The suction is in the upper left.</think><answer>left-top</answer>"
    report = score(ITEMS[:1], [text], PromptMode.REASON, SIZE)
    assert report["coherence_rate"] == 0.0


@pytest.mark.slow
def test_eval_command_on_a_tiny_split(tiny_vqla, tmp_path):
    from surgery_r1_ros.cli import main
    from surgery_r1_ros.model import build_builtin, save_model

    dims = {"image_width": 56, "image_height": 56, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "mrope_section": [4, 6, 6],
            "vision_depth": 1, "vision_hidden_size": 32, "vision_intermediate_size": 64, "vision_num_heads": 1,
            "vocab_size": 512}  # fmt: skip
    model = save_model(build_builtin(**dims), tmp_path / "model")
    for flag, out in (("--no-reasoning", tmp_path / "direct"), ("--reasoning", tmp_path / "reason")):
        code = main(["eval", "--model", str(model), "--data", str(tiny_vqla), "--split", "test", "--out", str(out),
                     flag, "--max-new-tokens", "8", "--batch-size", "4"])  # fmt: skip
        assert code == 0
        report = json.loads((out / "report.json").read_text())
        assert report["n"] == 6  # seq_1 and seq_5 are the EndoVis-18 test sequences
        assert set(report) >= {"accuracy", "f_score", "miou_legacy", "miou", "coherence_rate", "format_rate", "n"}
        assert (out / "confusion.png").is_file() and (out / "per_class.csv").is_file()
        assert len((out / "predictions.jsonl").read_text().splitlines()) == 6
    assert json.loads((tmp_path / "reason" / "report.json").read_text())["mode"] == "reason"


def test_generate_encodes_each_frame_once_and_answers_as_if_it_encoded_every_prompt(tiny_vqla):
    from surgery_r1_ros.training import evaluate

    from surgery_r1_ros.model import load_model

    loaded = load_model(None)  # the built-in model: its answers depend on the frame
    items = evaluate.items_of(tiny_vqla, "all")  # 11 questions about 4 frames
    frames_encoded = []
    loaded.model.model.visual.register_forward_hook(lambda _m, args, kw, _o: frames_encoded.append(len(kw["grid_thw"])),
                                                    with_kwargs=True)  # fmt: skip
    once = evaluate.generate(loaded, items, PromptMode.REASON, batch_size=8, max_new_tokens=48)
    assert sum(frames_encoded) == len({item.image_path for item in items}) == 4
    frames_encoded.clear()
    every = evaluate.generate(loaded, items, PromptMode.REASON, batch_size=8, max_new_tokens=48, share_frames=False)
    assert sum(frames_encoded) == len(items)
    assert once == every
