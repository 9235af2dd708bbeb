"""The measurement scripts under benchmarks/ that the README quotes: their scoring rules and their model calls."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_box_rules_score_greedy_median_consensus_and_best_sample():
    script = load_script("box_sampling")
    row = {"box": [0, 0, 100, 100], "predicted_box": [0, 0, 100, 50]}
    samples = [(0.0, 0.0, 100.0, 100.0), (0.0, 0.0, 90.0, 100.0), (0.0, 0.0, 80.0, 100.0), (200.0, 200.0, 300.0, 300.0)]
    scores = script.rule_ious(row, samples)
    assert scores["greedy"] == pytest.approx(0.5)
    assert scores["median"] == pytest.approx(0.95)  # per coordinate: x2 is the median of 100, 90, 80, 300
    assert scores["mean"] < 0.2  # the outlier drags the mean box away
    assert scores["consensus"] == pytest.approx(0.9)  # the middle sample agrees most with the others
    assert scores["best_sample"] == pytest.approx(1.0)
    assert script.question_type("Where is suction located?") == "location"
    assert script.question_type("What is the state of suction?") == "state"


def test_sampled_boxes_after_the_greedy_answer_parse(tmp_path):
    """The built-in model's sampled box continuations are read by the protocol's parser (its tags are special)."""
    import torch

    from surgery_r1_ros.data.synth import SynthOptions, generate_dataset
    from surgery_r1_ros.model import load_model

    script = load_script("box_sampling")
    generate_dataset(tmp_path, SynthOptions(sequences=1, frames_per_sequence=1, seed=3, size=(336, 280)))
    torch.manual_seed(0)
    row = {"image": str(next(tmp_path.glob("seq_*/left_frames/*.png"))), "question": "What organ is being operated?",
           "completion": "<answer>kidney</answer><box>[050,040,300,240]</box>"}  # fmt: skip
    boxes = script.sampled_boxes(load_model(None), row, samples=6)
    assert len(boxes) >= 3
    assert all(len(b) == 4 and b[0] <= b[2] and b[1] <= b[3] for b in boxes)


def test_frame_check_pairs_frames_of_two_sequences(tiny_vqla, tmp_path):
    script = load_script("next_token_frame_check")
    pairs = script.frame_pairs(tiny_vqla, pairs=20, seed=0)
    assert len(pairs) == 20 and all(a.parents[1] != b.parents[1] for a, b in pairs)
    one_sequence = tmp_path / "one"
    (one_sequence / "seq_1" / "left_frames").mkdir(parents=True)
    (one_sequence / "seq_1" / "left_frames" / "frame000.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="two sequences"):
        script.frame_pairs(one_sequence, pairs=1, seed=0)
    summary = script.summary([0.01, 0.2, 0.06, 0.04])
    assert summary["passes"] == 2 and summary["pairs"] == 4
    assert json.dumps(summary)  # what the script writes


def test_grpo_ablation_runs_the_pipelines_grpo_block_with_one_weight_and_seed_swapped(tmp_path):
    import yaml
    from surgery_r1_ros.training.builtin import stage_config
    from surgery_r1_ros.training.config import find_config

    script = load_script("grpo_reward_ablation")
    pipeline = yaml.safe_load(find_config("builtin_pipeline").read_text())["rft"]
    block = script.grpo_block(0.25, 9)
    assert block["rewards"] == {**pipeline["rewards"], "coherence": 0.25}
    assert block["data"] == {**pipeline["data"], "seed": 9}
    assert block["trainer"] == pipeline["trainer"] and "time_budget_minutes" not in block
    config = stage_config("rft", "rft", "sft_model", tmp_path / "rft", tmp_path / "mix.jsonl", block)
    assert config.rewards["coherence"] == 0.25 and config.data.seed == 9


def test_location_probe_reads_the_box_tokens_and_the_answer_position(tmp_path):
    """The location probe's rows come from an eval's location predictions; one pass gives, per question, the
    box-mean state of every layer, the last layer's heads where the answer is predicted, and a mass in [0, 1]."""
    from surgery_r1_ros.data.synth import SynthOptions, generate_dataset
    from surgery_r1_ros.model import load_model

    script = load_script("location_probe")
    assert [script.quadrant(b, (336, 280)) for b in ([0, 0, 10, 10], [0, 200, 10, 280], [300, 0, 336, 9])] == [0, 1, 2]
    generate_dataset(tmp_path, SynthOptions(sequences=1, frames_per_sequence=1, seed=3, size=(336, 280)))
    image = str(next(tmp_path.glob("seq_*/left_frames/*.png")))
    predictions = [
        {"image": image, "question": "Where is suction located?", "answer": "left-top", "predicted": "left-top",
         "box": [10.0, 20.0, 100.0, 90.0]},
        {"image": image, "question": "What is the state of suction?", "answer": "Idle", "predicted": "Idle",
         "box": [10.0, 20.0, 100.0, 90.0]},
        {"image": image, "question": "Where is stapler located?", "answer": "right-bottom", "predicted": "left-top",
         "box": [200.0, 150.0, 330.0, 270.0]},
    ]  # fmt: skip
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    rows, right = script.test_rows(path, (336, 280))
    assert [r["question"] for r in rows] == ["Where is suction located?", "Where is stapler located?"]
    assert right.tolist() == [True, False]
    loaded = load_model(None, attn_implementation="eager")
    read = script.read(loaded, rows)
    config = loaded.model.config.text_config
    assert read["layers"].shape == (2, config.num_hidden_layers + 1, config.hidden_size)
    assert read["heads"].shape == (2, config.num_attention_heads, config.hidden_size // config.num_attention_heads)
    assert read["quadrant"].tolist() == [0, 3] and ((read["mass"] > 0) & (read["mass"] < 1)).all()
    assert not np.allclose(read["layers"][0], read["layers"][1])  # two boxes: two different means
