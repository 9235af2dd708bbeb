"""The two training stages on a micro model and a micro synthetic dataset: SFT, GRPO, configs, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from surgery_r1_ros.training.config import RFT_REQUIRED, find_config, from_dict, load_config

REPO = Path(__file__).resolve().parent.parent
READOUT_ROWS = "answer, tag, name and state rows of the output head refit"  # the card's stage-table label
MICRO_DIMS = {
    "image_width": 56, "image_height": 56, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "mrope_section": [4, 6, 6], "vision_depth": 1,
    "vision_hidden_size": 32, "vision_intermediate_size": 64, "vision_num_heads": 1, "vocab_size": 512,
}  # fmt: skip


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict[str, Path]:
    """A micro synthetic dataset, its mix and a random-init micro model."""
    from surgery_r1_ros.data.mix import build_mix, write_mix
    from surgery_r1_ros.data.synth import SynthOptions, generate_dataset
    from surgery_r1_ros.data.vqla import load_vqla
    from surgery_r1_ros.model import build_builtin, save_model

    root = tmp_path_factory.mktemp("micro")
    data = root / "data"
    generate_dataset(data, SynthOptions(sequences=2, frames_per_sequence=2, seed=3, size=(140, 112), test_fraction=0.0,
                                        difficulty="easy"))  # fmt: skip
    records = build_mix(load_vqla(data, "all"), seed=0)
    mix = write_mix(records, root / "mix.jsonl")
    texts = [r["question"] for r in records] + [r["reasoning"] for r in records if r["reasoning"]]
    model = save_model(build_builtin(texts, **MICRO_DIMS), root / "model")
    return {"root": root, "data": data, "mix": mix, "model": model}


def sft_config(micro: dict, out: Path, **trainer) -> dict:
    return {
        "stage": "sft",
        "model": str(micro["model"]),
        "output_dir": str(out),
        "data": {"mix": str(micro["mix"]), "kinds": ["grounding", "vqa", "cot"]},
        "trainer": {
            "max_steps": 3,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 2,
            "disable_tqdm": True,
            "seed": 0,
            **trainer,
        },
    }


def rft_config(micro: dict, out: Path, **trainer) -> dict:
    return {
        "stage": "rft",
        "model": str(micro["model"]),
        "output_dir": str(out),
        "data": {"mix": str(micro["mix"]), "kinds": ["grounding", "cot"]},
        "rewards": {"format": 0.5, "accuracy": 1.0, "iou": 1.0, "coherence": 0.5},
        "trainer": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "beta": 0.02,
            "loss_type": "grpo",
            "max_completion_length": 12,
            "temperature": 1.0,
            "learning_rate": 1e-4,
            "logging_steps": 1,
            "save_steps": 1,
            "disable_tqdm": True,
            **trainer,
        },
    }


# -- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["builtin_sft", "builtin_rft", "qwen3b_sft", "qwen3b_rft", "qwen7b_sft", "qwen7b_rft"])
def test_shipped_configs_load(name):
    config = load_config(name)
    assert config.stage in ("sft", "rft")
    if config.stage == "rft":
        assert all(k in config.trainer for k in RFT_REQUIRED)
    if name.startswith("qwen"):
        assert config.lora is not None and config.trainer["bf16"] and config.trainer["activation_checkpointing"]


def test_pipeline_configs_exist_and_pass_the_spec_check():
    from surgery_r1_ros.training.builtin import check_spec

    for name in ("builtin_pipeline", "builtin_micro"):
        path = find_config(name)
        check_spec(yaml.safe_load(path.read_text()), str(path))


@pytest.mark.parametrize(
    ("block", "key", "allowed"),
    [("last_layer", "question", "questions"), ("readout", "own_reasonning", "own_reasoning"),
     ("eval", "batchsize", "batch_size"), ("sft_b", "freeze_vison", "freeze_vision"), ("rft", "reward", "rewards")],
)  # fmt: skip
def test_a_mistyped_pipeline_key_fails_before_any_stage_runs(tmp_path, block, key, allowed):
    from surgery_r1_ros.training.builtin import run_builtin

    spec = yaml.safe_load(find_config("builtin_micro").read_text())
    spec[block] = {**spec[block], key: 1}
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=rf"{block}.*unknown key\(s\) {key};.*{allowed}"):
        run_builtin(tmp_path / "out", tmp_path / "work", str(config))
    assert not (tmp_path / "work").exists()


def test_micro_pipeline_runs_every_stage_installs_the_last_refit_and_resumes(tmp_path):
    """`surgery-r1 train builtin --config builtin_micro`: every stage in order, the last refit's model installed
    with its card; run again with ``--resume``, no stage runs twice."""
    from surgery_r1_ros.training.builtin import run_builtin

    from surgery_r1_ros.model import load_model

    out, work = tmp_path / "out", tmp_path / "work"
    card = run_builtin(out, work, "builtin_micro")
    state_file = work / "stages.json"
    state = json.loads(state_file.read_text())
    assert list(state) == ["synth", "mix", "init", "vision", "sft_a", "sft_b", "rft", "readout", "last_layer",
                           "readout_again", "eval", "reliance", "install"]  # fmt: skip
    assert all(stage["done"] for stage in state.values())
    assert state["readout_again"]["result"]["final"] == str(work / "readout_again")
    installed, refit = load_model(out).model, load_model(work / "readout_again").model
    assert torch.equal(installed.lm_head.weight, refit.lm_head.weight)
    info = json.loads((out / "surgery_r1.json").read_text())
    assert info["pipeline"].endswith("(synth -> mix -> vision pre-training -> SFT -> GRPO -> readout -> last layer -> "
                                     "readout)")  # fmt: skip
    text = card.read_text()
    for label in ("SFT + GRPO", "+ readout refit", "+ last-layer refit", "+ readout refit again"):
        assert f"| {label} | " in text
    evaluated = {f"readout_again/{run}" for run in ("direct", "reason", "direct/swapped", "direct/degraded")}
    assert set(state["eval"]["result"]) >= evaluated
    written = state_file.read_bytes()
    run_builtin(out, work, "builtin_micro", resume=True)
    assert state_file.read_bytes() == written


def test_readout_again_needs_the_blocks_it_repeats(tmp_path):
    from surgery_r1_ros.training.builtin import check_spec

    spec = yaml.safe_load(find_config("builtin_micro").read_text())
    check_spec(spec, "micro")
    del spec["readout"]
    with pytest.raises(ValueError, match=r"readout_again repeats the readout block's refit: it needs that block"):
        check_spec(spec, "micro")


def test_a_refit_block_with_no_settings_runs_with_the_defaults():
    from surgery_r1_ros.training.builtin import REFITS

    asked = {refit.name: refit.asked for refit in REFITS}
    assert asked["readout"]({"readout": None}) and asked["readout"]({"readout": {}})  # `readout:` alone: defaults
    assert not asked["readout"]({}) and not asked["last_layer"]({"readout": {}})
    assert asked["readout_again"]({"readout_again": True}) and not asked["readout_again"]({"readout_again": False})


def test_rft_config_must_set_grpo_knobs(micro, tmp_path):
    raw = rft_config(micro, tmp_path)
    del raw["trainer"]["beta"]
    with pytest.raises(ValueError, match="beta"):
        from_dict(raw)


def test_config_rejects_unknown_keys(micro, tmp_path):
    raw = sft_config(micro, tmp_path)
    raw["optimiser"] = "sgd"
    with pytest.raises(ValueError, match="unknown key"):
        from_dict(raw)


def test_config_overrides(micro, tmp_path):
    config = from_dict(sft_config(micro, tmp_path), overrides={"trainer.max_steps": 7, "output_dir": "x"})
    assert config.trainer["max_steps"] == 7 and config.output_dir == "x"


# -- data ------------------------------------------------------------------------------------------------------


def test_sft_rows_scale_boxes_to_the_model_input(micro):
    from surgery_r1_ros.training.config import DataConfig
    from surgery_r1_ros.training.dataset import load_records, sft_row

    from surgery_r1_ros.protocol import parse_output

    records = load_records(DataConfig(mix=str(micro["mix"]), kinds=["grounding"]))
    record = records[0]
    row = sft_row(record, (56, 56))
    box = parse_output(row["target"]).box
    w, h = record["image_size"]
    assert row["mode"] == "ground"
    assert box == pytest.approx([round(record["box"][0] * 56 / w), round(record["box"][1] * 56 / h),
                                 round(record["box"][2] * 56 / w), round(record["box"][3] * 56 / h)])  # fmt: skip


def test_collator_masks_everything_but_the_completion(micro):
    from surgery_r1_ros.training.config import DataConfig
    from surgery_r1_ros.training.dataset import ImageCache, SFTCollator, load_records, sft_row

    from surgery_r1_ros.model import load_model

    loaded = load_model(micro["model"])
    records = load_records(DataConfig(mix=str(micro["mix"]), kinds=["vqa"]))[:2]
    rows = [sft_row(r, (56, 56)) for r in records]
    batch = SFTCollator(loaded.processor, ImageCache())(rows)
    tok = loaded.processor.tokenizer
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled) == row["target"] + "<|im_end|>"


# -- stages ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_runs_and_writes_safetensors_metrics_and_plot(micro, tmp_path):
    from surgery_r1_ros.training.sft import run_sft

    from surgery_r1_ros.model import load_model

    out = tmp_path / "sft"
    final = run_sft(from_dict(sft_config(micro, out)))
    assert (final / "model.safetensors").is_file() and (out / "checkpoint-2" / "model.safetensors").is_file()
    assert (out / "loss.png").is_file()
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,") and "loss" in lines[0] and len(lines) >= 4
    load_model(final)  # the result is a loadable model folder


def test_frozen_tower_with_a_trained_merger(micro, tmp_path):
    from safetensors.torch import load_file
    from surgery_r1_ros.training.sft import run_sft

    raw = sft_config(micro, tmp_path / "sft", learning_rate=1e-2)
    with pytest.raises(ValueError, match="train_merger applies with freeze_vision"):
        from_dict({**raw, "train_merger": True})
    final = run_sft(from_dict({**raw, "freeze_vision": True, "train_merger": True}))
    before, after = load_file(micro["model"] / "model.safetensors"), load_file(final / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    merger = {name for name in before if name.startswith("visual.merger.")}
    tower = {name for name in before if name.startswith("visual.")} - merger
    assert merger <= changed  # the projection into the language model trained ...
    assert not tower & changed  # ... the rest of the tower did not
    assert changed - merger  # and the language model trained


@pytest.mark.slow
def test_sft_with_lora_merges_into_a_plain_model(micro, tmp_path):
    from surgery_r1_ros.training.sft import run_sft

    from surgery_r1_ros.model import load_model

    raw = sft_config(micro, tmp_path / "lora", max_steps=1)
    raw["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    final = run_sft(from_dict(raw))
    loaded = load_model(final)
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())


@pytest.mark.slow
def test_grpo_runs_with_all_rewards(micro, tmp_path):
    from surgery_r1_ros.training.rft import run_rft

    out = tmp_path / "rft"
    final = run_rft(from_dict(rft_config(micro, out)))
    assert (final / "model.safetensors").is_file()
    header = (out / "metrics.csv").read_text().splitlines()[0]
    for name in ("format_reward", "accuracy_reward", "iou_reward", "coherence_reward"):
        assert f"rewards/{name}/mean" in header
    assert (out / "rewards.png").is_file()


def test_existing_checkpoints_need_resume(micro, tmp_path):
    from surgery_r1_ros.training.common import prepare_output

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="--resume"):
        prepare_output(from_dict(sft_config(micro, tmp_path)), resume=False)


# -- kill and resume -------------------------------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
from transformers import TrainerCallback
from surgery_r1_ros.training.config import load_config
from surgery_r1_ros.training.sft import run_sft

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: a real crash

run_sft(load_config(sys.argv[1]), resume=len(sys.argv) > 3, callbacks=[Kill()])
"""


def _write_config(raw: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(micro, tmp_path):
    """SIGKILL after step 3 (checkpoint at 2), resume to 4: same step, optimizer state and weights as 4 straight."""
    from safetensors.torch import load_file
    from surgery_r1_ros.training.sft import run_sft

    straight = tmp_path / "straight"
    run_sft(from_dict(sft_config(micro, straight, max_steps=4)))

    killed = tmp_path / "killed"
    config = _write_config(sft_config(micro, killed, max_steps=4), tmp_path / "killed.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(config), "3"], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (killed / "checkpoint-2").is_dir() and not (killed / "checkpoint-4").exists()
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(config), "99", "resume"], env=env,
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]

    a, b = straight / "checkpoint-4", killed / "checkpoint-4"
    assert json.loads((a / "trainer_state.json").read_text())["global_step"] == 4
    assert json.loads((b / "trainer_state.json").read_text())["global_step"] == 4
    opt_a = torch.load(a / "optimizer.pt", weights_only=False)["state"]
    opt_b = torch.load(b / "optimizer.pt", weights_only=False)["state"]
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        assert int(opt_a[key]["step"]) == int(opt_b[key]["step"]) == 4
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_a[key][name], opt_b[key][name], rtol=1e-4, atol=1e-6)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
    # The metrics file reads as one run: step 3, logged before the kill, appears once.
    steps = [line.split(",")[0] for line in (killed / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[:4] == ["1", "2", "3", "4"]


# -- distributed -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_on_cpu(micro, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): both ranks step, rank 0 writes the checkpoint."""
    out = tmp_path / "ddp"
    config = _write_config(sft_config(micro, out, max_steps=2, save_steps=2), tmp_path / "ddp.yaml")
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "training" / "accelerate" / "cpu_ddp.yaml"),
           "--num_processes", "2", "-m", "surgery_r1_ros.cli", "train", "sft", "--config", str(config)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / "final" / "model.safetensors").is_file()


# -- image reliance ---------------------------------------------------------------------------------------------


def test_image_reliance_compares_own_and_shuffled_frames(micro):
    from surgery_r1_ros.training.dataset import sft_dataset
    from surgery_r1_ros.training.reliance import image_reliance, teacher_forced_loss

    from surgery_r1_ros.data.mix import read_mix
    from surgery_r1_ros.model import image_size, load_model

    records = read_mix(micro["mix"])
    report = image_reliance(micro["model"], records, limit=12)
    assert report["n"] == 12
    assert report["gap"] == pytest.approx(report["loss_shuffled"] - report["loss_true"])
    assert report["loss_true"] > 0 and report["gap"] != 0.0  # the frames really were swapped

    # Rows that all share one frame: shuffling swaps nothing, so the loss is the same to the last bit.
    loaded = load_model(micro["model"])
    frame = records[0]["image"]
    same = [r for r in records if r["image"] == frame and r["kind"] == "grounding"]
    rows = [dict(r) for r in sft_dataset(same, image_size(loaded.processor))]
    assert teacher_forced_loss(loaded, rows, False) == teacher_forced_loss(loaded, rows, True)
    with pytest.raises(ValueError, match="two different frames"):
        image_reliance(micro["model"], same)


def test_model_card_tables_come_from_the_pipeline_records(tmp_path):
    from surgery_r1_ros.training.card import model_card

    row = {"n": 10, "accuracy": 0.5, "f_score": 0.25, "miou_legacy": 0.6, "miou": 0.3, "coherence_rate": None,
           "format_rate": 1.0}  # fmt: skip
    trainer = {"per_device_train_batch_size": 8, "learning_rate": 0.002}
    config = {"stage": "sft", "data": {"kinds": ["vqa"]}, "trainer": trainer}
    by_subject = {"stapler": {"n": 6, "accuracy": 0.5, "prior": 2 / 3, "answers": 1}}
    swapped_state = {"stapler": {**by_subject["stapler"], "accuracy": 0.25}}
    swapped = {**row, "accuracy": 0.2, "miou": 0.1, "state_by_subject": swapped_state}
    dense = {"cover_acc": 0.9, "cover_majority": 0.6, "read_quadrant_acc": 0.8, "read_quadrant_majority": 0.3,
             "pos_mae": 0.05}  # fmt: skip
    state = {
        "vision": {"seconds": 60.0, "result": {"steps": 30, "config": {"trainer": trainer},
                                               "before": {"cover_acc": 0.1, "pos_mae": 0.3}, "after": dense}},
        "sft_a": {"seconds": 120.0, "result": {"steps": 40, "config": {**config, "freeze_vision": True}}},
        "sft_b": {"seconds": 60.0, "result": {"steps": 20, "config": {**config, "box_attention": 0.5}}},
        "rft": {"seconds": 30.0, "result": {"steps": 7, "stopped_by_time": 7, "config": {
            **config, "stage": "rft", "trainer": {**trainer, "max_steps": 9},
            "rewards": {"format": 0.5, "accuracy": 1.0, "coherence": 0.0}}}},
        "eval": {"result": {"sft_grpo/direct": {**row, "accuracy_by_kind": {"organ": 1.0, "location": 0.5},
                                                "state_by_subject": by_subject},
                            "sft_grpo/direct/swapped": swapped,
                            "sft_grpo/reason": {**row, "accuracy_by_kind": {"state": 0.25}, "state_claims_rate": 0.9,
                                                "state_claim_accuracy": 0.3, "state_agreement_rate": 0.7}}},
        "reliance": {"result": {"sft": {"n": 64, "loss_true": 0.8, "loss_shuffled": 1.1, "gap": 0.3}}},
    }  # fmt: skip
    state["synth"] = {"seconds": 480.0, "result": {}}
    card = model_card(state, {}, tmp_path / "builtin_pipeline.yaml", "test-machine")
    assert "| SFT + GRPO | 0.500 | 0.250 | 0.600 | 0.300 | - | - | - | - | 1.000 | 10 |" in card
    assert "| SFT only | 0.800 | 1.100 | +0.300 | 64 |" in card
    assert "<answer>kidney</answer><box>[074,022,241,200]</box>" in card  # the output protocol, as the model writes it
    assert "| sft_a | sft (vision frozen) | vqa | 40 | 8 | 0.002 | 2.0 |" in card
    assert "| sft_b | sft + box attention x0.5 | vqa | 20 | 8 | 0.002 | 1.0 |" in card
    assert "| vision | dense (Trainer) | dense ground truth | 30 | 8 | 0.002 | 1.0 |" in card
    assert "| cover accuracy | 0.100 | 0.900 | 0.600 |" in card
    assert "| quadrant per instrument, read off its cells | - | 0.800 | 0.300 |" in card
    assert "| SFT + GRPO, direct | 1.000 | - | 0.500 |" in card  # organ, state, location
    assert "| frames of another sequence | 0.200 | -0.300 | 0.100 | -0.200 | 10 |" in card
    assert "| stapler | 6 | 0.500 | 0.250 | 0.667 | 1 |" in card
    assert "| SFT + GRPO | 0.250 | 0.900 | 0.300 | 0.700 |" in card  # reasoning's state claims
    assert "| rft | rft | vqa | 7 of 9, stopped by its time budget | 8 | 0.002 | 0.5 |" in card
    assert "12.5 min on test-machine" in card
    assert "GRPO with rewards format 0.5, accuracy 1 (coherence computed and logged, weight 0)" in card


def test_model_card_shows_the_readout_refit_as_the_final_model(tmp_path):
    from surgery_r1_ros.training.card import model_card

    row = {"n": 10, "accuracy": 0.5, "f_score": 0.25, "miou_legacy": 0.6, "miou": 0.3, "coherence_rate": None,
           "format_rate": 1.0}  # fmt: skip
    refit = {"kinds": ["grounding", "cot"], "best_step": 7, "positions": 99, "lr": 0.01}
    state = {
        "readout": {"seconds": 90.0, "result": refit},
        "eval": {"result": {"sft_grpo/direct": row, "sft_grpo/direct/swapped": {**row, "accuracy": 0.4},
                            "readout/direct": {**row, "accuracy": 0.7},
                            "readout/direct/swapped": {**row, "accuracy": 0.3}}},
    }  # fmt: skip
    card = model_card(state, {}, tmp_path / "builtin_pipeline.yaml", "test-machine")
    row = f"| readout | {READOUT_ROWS} | grounding, cot | 7 | 99 positions | 0.01 | 1.5 |"
    assert row in card
    assert "| + readout refit | 0.700 | 0.250 |" in card
    assert "| frames of another sequence | 0.300 | -0.400 |" in card  # the final model's, not GRPO's
    assert "rows of the answer labels, protocol tags, instrument names and state words are refit" in card
    del state["readout"], state["eval"]["result"]["readout/direct"], state["eval"]["result"]["readout/direct/swapped"]
    card = model_card(state, {}, tmp_path / "builtin_pipeline.yaml", "test-machine")
    assert "refit" not in card and "| frames of another sequence | 0.400 | -0.100 |" in card


def test_model_card_shows_the_readout_refit_before_the_last_layer_refit(tmp_path):
    from surgery_r1_ros.training.card import model_card

    row = {"n": 10, "accuracy": 0.5, "f_score": 0.25, "miou_legacy": 0.6, "miou": 0.3, "coherence_rate": None,
           "format_rate": 1.0}  # fmt: skip
    readout = {"kinds": ["grounding"], "best_step": 7, "positions": 99, "lr": 0.01}
    state = {
        "readout": {"seconds": 90.0, "result": readout},
        "eval": {"result": {"sft_grpo/direct": row, "sft_grpo/direct/swapped": {**row, "accuracy": 0.4},
                            "readout/direct": {**row, "accuracy": 0.7, "accuracy_by_kind": {"state": 0.6}},
                            "readout/direct/swapped": {**row, "accuracy": 0.3}}},
    }  # fmt: skip
    card = model_card(state, {}, tmp_path / "builtin_pipeline.yaml", "test-machine")
    assert f"| readout | {READOUT_ROWS} | grounding | 7 | 99 positions |" in card
    assert "| SFT + GRPO | 0.500 | 0.250 |" in card and "| + readout refit | 0.700 | 0.250 |" in card
    assert "| readout refit, direct | - | 0.600 | - |" in card
    assert "| frames of another sequence | 0.300 | -0.400 |" in card  # the final model's, not GRPO's
    refit = {"kinds": ["grounding", "cot"], "best_step": 30, "steps": 40, "rows": 120, "lr": 3e-4,
             "keep_boxes": True, "own_reasoning_rows": 20}  # fmt: skip
    state["last_layer"] = {"seconds": 600.0, "result": refit}
    state["eval"]["result"].update({"last_layer/direct": {**row, "accuracy": 0.8},
                                    "last_layer/direct/swapped": {**row, "accuracy": 0.2}})  # fmt: skip
    card = model_card(state, {}, tmp_path / "builtin_pipeline.yaml", "test-machine")
    stage_row = ("| last_layer | last decoder layer + final norm (SFT loss, cached inputs) | grounding, cot + 20 own "
                 "reasoning | 30 of 40 | 120 rows | 0.0003 | 10.0 |")  # fmt: skip
    assert stage_row in card and "box positions held to the model's own box distribution" in card
    assert card.index("| readout |") < card.index("| last_layer |")  # the stages in the order they ran
    assert card.index("output head's rows") < card.index("last decoder layer and final norm are trained")
    assert card.index("| + readout refit | 0.700 |") < card.index("| + last-layer refit | 0.800 |")
    assert "| frames of another sequence | 0.200 | -0.600 |" in card  # now the last-layer refit's
    assert "box attention" not in card
    refit.update(box_attention=0.5, box_attention_mass_before=0.11, box_attention_mass_after=0.83)
    card = model_card(state, {}, tmp_path / "builtin_pipeline.yaml", "test-machine")
    assert "look at the question's box while it writes the\nanswer and box, and the reasoning's sentences about the " \
           "question's subject (box attention, weight\n0.5: held-out attention mass on the box 0.11 ->\n0.83)" \
           in card  # fmt: skip
    refit["box_attention_questions"] = ["location"]
    card = model_card(state, {}, tmp_path / "builtin_pipeline.yaml", "test-machine")
    assert "about the question's subject of location questions (box attention, weight\n0.5" in card
    state["readout_again"] = {"seconds": 60.0, "result": {**readout, "best_step": 5}}
    state["eval"]["result"].update({"readout_again/direct": {**row, "accuracy": 0.9},
                                    "readout_again/direct/swapped": {**row, "accuracy": 0.1}})  # fmt: skip
    card = model_card(state, {}, tmp_path / "builtin_pipeline.yaml", "test-machine")
    again_row = f"| readout_again | {READOUT_ROWS} | grounding | 5 | 99 positions |"
    assert card.index("| last_layer |") < card.index(again_row)
    assert "; then those output head rows are refit once more" in card
    assert card.index("| + last-layer refit | 0.800 |") < card.index("| + readout refit again | 0.900 |")
    assert "| frames of another sequence | 0.100 | -0.800 |" in card  # the final model: the second readout refit's


def test_pipeline_installs_the_model_of_the_last_refit_that_ran(micro, two_layer_model, tmp_path):
    from surgery_r1_ros.training.builtin import Pipeline

    from surgery_r1_ros.model import load_model

    p = Pipeline(tmp_path / "out", tmp_path / "work", {}, resume=False)
    p.state = {stage: {"result": {"final": str(micro["model"])}} for stage in ("synth", "mix", "sft_b", "rft")}
    p.state["readout"] = {"result": {"final": str(two_layer_model)}}
    p.install()
    installed = load_model(tmp_path / "out")
    assert installed.model.config.text_config.num_hidden_layers == 2  # the readout refit's model
    info = json.loads((tmp_path / "out" / "surgery_r1.json").read_text())
    assert info["pipeline"].endswith("(synth -> mix -> SFT -> GRPO -> readout)")
    p.state["last_layer"] = {"result": {"final": str(micro["model"])}}
    p.install()
    assert load_model(tmp_path / "out").model.config.text_config.num_hidden_layers == 1  # the last-layer refit's
    assert json.loads((tmp_path / "out" / "surgery_r1.json").read_text())["pipeline"].endswith("-> last layer)")
    p.state["readout_again"] = {"result": {"final": str(two_layer_model)}}
    p.install()
    assert load_model(tmp_path / "out").model.config.text_config.num_hidden_layers == 2  # the second readout's
    info = json.loads((tmp_path / "out" / "surgery_r1.json").read_text())
    assert info["pipeline"].endswith("GRPO -> readout -> last layer -> readout)")


# -- stage 0: vision pre-training ---------------------------------------------------------------------------------


def test_cell_targets_follow_the_dense_mask():
    import numpy as np
    from surgery_r1_ros.training.vision_pretrain import CELL, IGNORE, cell_targets

    from surgery_r1_ros.vocab import INSTRUMENTS, QUADRANTS, STATES

    size = (3 * CELL, 2 * CELL)  # 3 x 2 cells
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:CELL, :CELL] = INSTRUMENTS.index("suction") + 1  # top-left cell: the suction tube's tip
    mask[:CELL, 2 * CELL :] = INSTRUMENTS.index("suction") + 1  # top-right cell: more of it, two cells from the tip
    mask[CELL:, 2 * CELL :] = 9  # bottom-right cell: organ
    record = {
        "size": [size[0] * 2, size[1] * 2],  # the record is in pixels of a frame twice the model's size
        "instruments": [{"name": "suction", "state": "Suction", "box": [0, 0, 2 * CELL, 2 * CELL],
                         "quadrant": "left-top", "tip": [CELL, CELL]}],
    }  # fmt: skip
    t = cell_targets(mask, record, size)
    suction = INSTRUMENTS.index("suction") + 1
    assert t["cover"].tolist() == [suction, 0, suction, 0, 0, 0]
    assert t["organ"].tolist() == [0, 0, 0, 0, 0, 1]
    assert t["tip"][0] == suction and t["tip"][5] == 0  # the tip (at 14, 14 model px) is near cell 0 only
    near_tip = [0, 1, 3, 4]  # within TIP_RADIUS (1.5 cells) of the tip, covered or not; cell 2 is 2 cells away
    assert t["state"].tolist() == [STATES.index("Suction") if i in near_tip else IGNORE for i in range(6)]
    assert t["tool_state"].tolist() == [STATES.index("Suction"), IGNORE, STATES.index("Suction")] + [IGNORE] * 3
    assert t["quadrant"].tolist() == [QUADRANTS.index("left-top"), IGNORE, QUADRANTS.index("left-top")] + [IGNORE] * 3
    np.testing.assert_allclose(t["box"][0], [0, 0, 1 / 3, 1 / 2])
    np.testing.assert_allclose(t["pos"][4], [(1 + 0.5) / 3, (1 + 0.5) / 2])


def test_instruments_are_read_off_the_cells_the_head_gives_them():
    """Majority vote over the cells predicted as each instrument; an instrument given no cell is a miss."""
    import numpy as np
    from surgery_r1_ros.training.vision_pretrain import IGNORE, read_instruments

    # two frames of 4 cells; frame 1: tool 1 (quadrant 2, state 5) on cells 0-1, tool 2 (quadrant 0, state 3) on 3
    truth = {"cover": np.array([1, 1, 0, 2, 0, 0, 0, 0]), "quadrant": np.array([2, 2, IGNORE, 0, *[IGNORE] * 4]),
             "tool_state": np.array([5, 5, IGNORE, 3, *[IGNORE] * 4])}  # fmt: skip
    # the head puts tool 1 on cells 0-2 (quadrants 2, 2, 1: majority right; states 4, 5, 4: majority wrong)
    # and tool 2 nowhere; frame 2 has no instrument, so nothing is counted there
    pred = {"cover": np.array([1, 1, 1, 0, 0, 0, 2, 0]), "quadrant": np.array([2, 2, 1, 0, 0, 0, 0, 0]),
            "tool_state": np.array([4, 5, 4, 3, 0, 0, 0, 0])}  # fmt: skip
    found = {name: (right.tolist(), values.tolist()) for name, (right, values) in
             read_instruments(pred, truth, cells=4).items()}  # fmt: skip
    assert found == {"quadrant": ([True, False], [2, 0]), "tool_state": ([False, False], [5, 3])}


def test_vision_pretraining_trains_the_tower_and_saves_a_plain_model(micro, tmp_path):
    """A few steps on a micro config: only the vision tower changes, and the head is not saved."""
    from safetensors.torch import load_file
    from surgery_r1_ros.training.vision_pretrain import run_vision_pretrain

    from surgery_r1_ros.model import load_model

    trainer = {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
               "save_steps": 2, "disable_tqdm": True}  # fmt: skip
    result = run_vision_pretrain(micro["model"], micro["data"], micro["data"], tmp_path / "vision", trainer)
    expected = {"cover_acc", "state_acc", "tool_state_acc", "read_quadrant_acc", "read_tool_state_acc", "pos_mae"}
    assert result["steps"] == 3 and set(result["after"]) >= expected
    before = load_file(Path(micro["model"]) / "model.safetensors")
    after = load_file(Path(result["final"]) / "model.safetensors")
    assert set(before) == set(after)  # same tensors: no head in the saved model
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("visual" in k for k in changed)
    assert type(load_model(result["final"]).model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert (tmp_path / "vision" / "metrics.csv").is_file()


def test_reliance_gate_fails_a_model_fed_constant_image_tokens(micro, tmp_path):
    """With the merger's output zeroed every frame becomes the same tokens: the gate must stop the stage."""
    from surgery_r1_ros.training.reliance import RelianceError, image_reliance, require_reliance

    from surgery_r1_ros.data.mix import read_mix
    from surgery_r1_ros.model import load_model, save_model

    loaded = load_model(micro["model"])
    with torch.no_grad():
        last = loaded.model.model.visual.merger.mlp[-1]
        last.weight.zero_()
        last.bias.fill_(0.5)
    blind = save_model(loaded, tmp_path / "blind")
    records = read_mix(micro["mix"])
    with pytest.raises(RelianceError, match="barely uses the image"):
        require_reliance(blind, records, min_gap=1e-6, stage="sft_a", limit=12)
    # constant image tokens: shuffling frames cannot move the loss; the unmodified model's frames do move it
    # (its sign is the draw's: the micro model is trained for a few steps only)
    blind_gap = image_reliance(blind, records, limit=12)["gap"]
    own_gap = image_reliance(micro["model"], records, limit=12)["gap"]
    assert abs(blind_gap) < 1e-6 < abs(own_gap)


def test_eval_frame_variants(micro):
    import numpy as np
    from surgery_r1_ros.training.augment import augment, degrade
    from surgery_r1_ros.training.evaluate import degrade_seed, generate, items_of, swapped_frames

    items = items_of(micro["data"], "all")
    mapping = swapped_frames(items)
    assert set(mapping) == {i.image_path for i in items}
    assert all(Path(a).parents[1] != Path(b).parents[1] for a, b in mapping.items())  # another sequence
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    assert np.array_equal(degrade(image, seed=1), degrade(image, seed=1))
    assert degrade(image).mean() < image.mean()  # darker
    frame = "seq_1/left_frames/frame000.png"  # the same frame wherever the dataset lives: the same noise
    assert degrade_seed(f"runs/a/data/test/{frame}") == degrade_seed(f"/data/test/{frame}")
    assert len({degrade_seed(f"x/{p}") for p in (frame, frame.replace("1", "2", 1), frame.replace("000", "001"))}) == 3
    varied = augment(image, np.random.default_rng(0))
    assert varied.shape == image.shape and varied.dtype == np.uint8 and not np.array_equal(varied, image)
    with pytest.raises(ValueError, match="frames must be one of"):
        generate(None, items, None, frames="mirrored")


# -- box attention ---------------------------------------------------------------------------------------------


def test_box_cells_are_the_cells_whose_centre_lies_in_the_box():
    import numpy as np
    from surgery_r1_ros.training.box_attention import box_cells

    cells = box_cells((30, 0, 84, 28), (112, 84)).reshape(3, 4)  # 28 px cells; centres at 14, 42, 70, 98
    assert cells.tolist() == [[False, True, True, False], [False] * 4, [False] * 4]
    tiny = box_cells((60, 60, 62, 62), (112, 84)).reshape(3, 4)  # inside no cell's centre: the cell under it
    assert np.argwhere(tiny).tolist() == [[2, 2]]
    assert not box_cells(None, (112, 84)).any()


def test_box_attention_loss_is_minus_log_of_the_mass_on_the_box():
    import math

    from surgery_r1_ros.training.box_attention import box_attention_loss

    image_id = 9
    input_ids = torch.tensor([[1, 9, 9, 9, 9, 2, 3, 4], [1, 9, 9, 9, 9, 2, 3, 4]])
    labels = torch.tensor([[-100] * 6 + [3, 4], [-100] * 6 + [3, 4]])  # positions 5 and 6 predict the targets
    cells = torch.tensor([[True, False, False, False], [False] * 4])  # row 1 has no box: not supervised
    weights = torch.zeros(2, 2, 8, 8)
    weights[:, 0, :, 1:5] = 0.25  # head 0 spreads evenly over the 4 image tokens
    weights[:, 1, :, 1] = 1.0  # head 1 (not supervised) looks at the box only
    every_target = torch.tensor([6, 6])  # from the first target token on
    loss, mass = box_attention_loss([weights], input_ids, labels, cells, every_target, image_id)
    assert mass == pytest.approx(0.25) and float(loss) == pytest.approx(-math.log(0.25), rel=1e-4)
    weights[0, 0, 6] = 0.0
    weights[0, 0, 6, 1] = 1.0  # head 0 on the box where the last target token is predicted
    loss, mass = box_attention_loss([weights], input_ids, labels, cells, every_target, image_id)
    assert mass == pytest.approx((0.25 + 1.0) / 2)
    loss, mass = box_attention_loss([weights], input_ids, labels, cells, torch.tensor([7, 7]), image_id)
    assert mass == pytest.approx(1.0) and float(loss) == pytest.approx(0.0, abs=1e-4)  # position 5 not supervised
    no_box = torch.zeros(2, 4, dtype=torch.bool)
    assert box_attention_loss([weights], input_ids, labels, no_box, every_target, image_id) is None
    with pytest.raises(ValueError, match="image tokens"):
        box_attention_loss([weights], input_ids, labels, cells[:, :3], every_target, image_id)


def test_box_attention_loss_weighs_every_row_alike_however_many_positions_it_has():
    """A chain of thought supervises several times the positions of a grounding row; each row counts once."""
    import math

    from surgery_r1_ros.training.box_attention import attention_loss

    loss, mass = attention_loss(torch.tensor([0.5, 0.5, 0.5, 1.0]), torch.tensor([0, 0, 0, 3]))
    assert float(loss) == pytest.approx(-math.log(0.5) / 2, rel=1e-4) and mass == pytest.approx(0.625)


def test_box_attention_looks_from_the_subjects_sentences_on_in_reasoning_rows(micro):
    """Without reasoning, every completion token is supervised; with it, the tokens from the first sentence that
    names the question's instrument on (organ questions: from ``</think>``), counted exactly."""
    from surgery_r1_ros.training.config import DataConfig
    from surgery_r1_ros.training.dataset import ImageCache, SFTCollator, load_records, sft_row

    from surgery_r1_ros.model import load_model
    from surgery_r1_ros.vocab import instrument_phrase

    processor = load_model(micro["model"]).processor
    records = load_records(DataConfig(mix=str(micro["mix"]), kinds=["vqa", "grounding", "cot"]))
    rows = [sft_row(r, (56, 56)) for r in records]
    batch = SFTCollator(processor, ImageCache(), box_cells=True)(rows)
    tokenizer = processor.tokenizer
    first_target = (batch["labels"] != -100).int().argmax(dim=1)
    columns = (rows, records, batch["box_from"], first_target, batch["input_ids"])
    for row, record, box_from, start, ids in zip(*columns, strict=True):
        attended = tokenizer.decode([t for t in ids[box_from:].tolist() if t != tokenizer.pad_token_id])
        assert attended == row["target"][row["attend_from"] :] + "<|im_end|>"
        assert (row["attend_box"] is None) == (record["box"] is None)
        if record["reasoning"] is None:
            assert box_from == start
        elif record["subject"] is None:
            assert attended.startswith("</think><answer>")
        else:
            assert box_from > start and instrument_phrase(record["subject"]) in attended.split(".")[0]
            assert instrument_phrase(record["subject"]) not in row["target"][: row["attend_from"]]
    assert {r["kind"] for r in records} == {"vqa", "grounding", "cot"}


def test_box_attention_training_points_the_head_at_the_box(micro, tmp_path):
    """The same SFT with and without the loss: with it, the supervised head looks at the box far more."""
    from surgery_r1_ros.training.box_attention import attention_on_boxes
    from surgery_r1_ros.training.config import DataConfig
    from surgery_r1_ros.training.dataset import load_records, sft_row
    from surgery_r1_ros.training.sft import run_sft

    from surgery_r1_ros.model import load_model

    with pytest.raises(ValueError, match="box_attention"):
        from_dict({**rft_config(micro, tmp_path / "r"), "box_attention": 1.0})
    raw = sft_config(micro, tmp_path / "plain", max_steps=20, learning_rate=1e-2, per_device_train_batch_size=4)
    raw["data"]["kinds"] = ["grounding"]
    plain = run_sft(from_dict(raw))
    supervised = run_sft(from_dict({**raw, "output_dir": str(tmp_path / "box"), "box_attention": 5.0}))
    assert "box_attention_mass" in (tmp_path / "box" / "metrics.csv").read_text().splitlines()[0]
    rows = [sft_row(r, (56, 56)) for r in load_records(DataConfig(mix=str(micro["mix"]), kinds=["grounding"]))]
    masses = [attention_on_boxes(load_model(m, attn_implementation="eager"), rows) for m in (plain, supervised)]
    assert masses[1] > masses[0] + 0.2, masses


def test_attentive_probe_reads_instruments_off_the_tower_tokens(micro, tmp_path):
    """Fitted on a few frames, the probe names each instrument's quadrant from the tokens; a blind tower
    (constant tokens) gives the same answers whichever frame it is shown."""
    import numpy as np
    from surgery_r1_ros.training.reader_probe import prior_accuracy, probe_reader

    from surgery_r1_ros.cli import main
    from surgery_r1_ros.model import load_model, save_model

    out = tmp_path / "probe.json"
    args = ["probe", "--model", str(micro["model"]), "--train", str(micro["data"]), "--test", str(micro["data"])]
    assert main([*args, "--steps", "300", "--out", str(out)]) == 0
    seen = json.loads(out.read_text())
    assert seen["own_frames"]["quadrant"] >= 0.9 and seen["test_items"] == seen["train_items"] > 4
    loaded = load_model(micro["model"])
    with torch.no_grad():
        loaded.model.model.visual.merger.mlp[-1].weight.zero_()
    blind = probe_reader(save_model(loaded, tmp_path / "blind"), micro["data"], micro["data"], steps=30)
    assert blind["own_frames"] == blind["swapped_frames"]
    train = np.array([[0, 1, 2, 5], [1, 1, 2, 6], [2, 1, 3, 6], [3, 4, 0, 0]])
    test = np.array([[0, 1, 2, 6], [1, 4, 1, 0], [2, 7, 0, 0]])  # instrument 7 never seen in training: a miss
    assert prior_accuracy(train, test, 2) == pytest.approx(1 / 3)
    assert prior_accuracy(train, test, 3) == pytest.approx(2 / 3)


# -- readout refit ------------------------------------------------------------------------------------------------


def _positions(n: int, hidden: int, classes: int, seed: int = 0):
    """Hidden states that encode their target token linearly (class direction + noise), 20 frames."""
    from surgery_r1_ros.training.readout import Positions

    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n,), generator=g)
    directions = torch.randn(classes, hidden, generator=g)
    states = directions[target] + 0.3 * torch.randn(n, hidden, generator=g)
    return Positions(states, target, torch.arange(n) % 20)


def test_readout_rows_loss_is_the_full_softmax_cross_entropy():
    """Caching the fixed rows' log-sum-exp changes nothing: the loss is cross-entropy over the whole vocabulary."""
    from surgery_r1_ros.training.readout import ReadoutRowsLoss

    positions = _positions(300, 16, 12)
    head = torch.randn(40, 16)
    rows = [3, 5, 7, 11]
    loss = ReadoutRowsLoss(head, rows, positions, chunk=64)
    expected = torch.nn.functional.cross_entropy(positions.hidden @ head.T, positions.target)
    assert loss(head[rows]).item() == pytest.approx(expected.item(), rel=1e-5)
    moved = head.clone()
    moved[rows] += 1.0
    expected = torch.nn.functional.cross_entropy(positions.hidden @ moved.T, positions.target)
    assert loss(moved[rows]).item() == pytest.approx(expected.item(), rel=1e-5)


def test_readout_fit_learns_the_answers_the_head_misses_and_leaves_other_rows():
    """Rows that read nothing (random) learn to name what the hidden states hold; held-out frames score it."""
    from surgery_r1_ros.training.readout import ReadoutRowsLoss, fit_readout_rows

    positions = _positions(2000, 16, 12)
    directions = torch.zeros(12, 16)
    for c in range(12):  # the head reads the non-answer classes right and the answer classes not at all
        directions[c] = positions.hidden[positions.target == c].mean(0)
    answers = [2, 4, 6, 8]
    head = directions.clone()
    head[answers] = torch.randn(4, 16) * 0.01
    fitted, result = fit_readout_rows(head, answers, positions, steps=200, lr=0.05)
    assert result["held_token_accuracy_before"] < 0.3 < 0.95 < result["held_token_accuracy_after"]
    assert result["held_loss_after"] < result["held_loss_before"] and result["best_step"] > 0
    others = [c for c in range(12) if c not in answers]
    assert torch.equal(fitted[others], head[others])
    assert ReadoutRowsLoss(fitted, answers, positions).token_accuracy(fitted[answers]) > 0.95


def test_readout_refit_writes_a_plain_model_with_its_own_head(micro, tmp_path):
    """`surgery-r1 train readout`: the saved model loads with an untied head; only answer, tag, name and state rows
    changed."""
    from surgery_r1_ros.training.readout import readout_token_ids

    from surgery_r1_ros.cli import main
    from surgery_r1_ros.model import load_model
    from surgery_r1_ros.model.tokenizer import TAG_TOKENS
    from surgery_r1_ros.vocab import instrument_phrase, state_phrase

    out = tmp_path / "readout"
    args = ["train", "readout", "--model", str(micro["model"]), "--mix", str(micro["mix"]), "--out", str(out)]
    assert main([*args, "--questions", "4", "--steps", "20"]) == 0
    before, after = load_model(micro["model"]), load_model(out)
    assert before.model.lm_head.weight is before.model.model.language_model.embed_tokens.weight
    assert after.model.lm_head.weight is not after.model.model.language_model.embed_tokens.weight
    assert not after.model.config.tie_word_embeddings
    embed = after.model.model.language_model.embed_tokens.weight
    assert torch.equal(embed, before.model.model.language_model.embed_tokens.weight)
    tokenizer = after.processor.tokenizer
    rows = readout_token_ids(tokenizer)
    assert set(tokenizer.convert_tokens_to_ids(list(TAG_TOKENS))) <= set(rows)  # the tags compete with answers
    name = tokenizer.encode(" " + instrument_phrase("bipolar_forceps"), add_special_tokens=False)
    assert set(name) <= set(rows)  # and the instrument names that reasoning writes
    state = tokenizer.encode(" " + state_phrase("Tissue_Manipulation"), add_special_tokens=False)
    assert set(state) <= set(rows)  # and the states as it writes them ("Its state is tissue manipulation: ...")
    assert not {tokenizer.convert_tokens_to_ids(d) for d in "0123456789"} & set(rows)  # box digits stay as trained
    others = torch.ones(embed.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(after.model.lm_head.weight[others], embed[others])
    readout = json.loads((out / "surgery_r1.json").read_text())["readout"]
    assert readout["best_step"] > 0 and readout["held_loss_after"] < readout["held_loss_before"]
    assert not torch.equal(after.model.lm_head.weight[rows], embed[rows])
    assert f"step {readout['best_step']} of 20" in (out / "README.md").read_text()


def test_own_reasoning_rows_put_the_true_answer_after_the_models_reasoning(micro, monkeypatch):
    """The model's own reasoning (its greedy completion) is kept, its answer and box replaced by the truth;
    a completion that never closes ``<think>`` gives no row."""
    from surgery_r1_ros.training import evaluate
    from surgery_r1_ros.training.dataset import model_box
    from surgery_r1_ros.training.readout import (
        collect_positions,
        own_reasoning_positions,
        own_reasoning_rows,
        token_ids,
    )

    from surgery_r1_ros.data.mix import read_mix
    from surgery_r1_ros.model import image_size, load_model
    from surgery_r1_ros.model.tokenizer import TAG_TOKENS
    from surgery_r1_ros.protocol import PromptMode, build_target
    from surgery_r1_ros.vocab import ANSWERS

    loaded = load_model(micro["model"])
    cot = [r for r in read_mix(micro["mix"]) if r["kind"] == "cot"][:3]
    wrong = next(a for a in ANSWERS if a != cot[0]["answer"])
    own = [f"<think>I see it at the top left.</think><answer>{wrong}</answer><box>1,2,3,4</box>",
           "<think>the frame shows", "<think>Something else.</think>"]  # fmt: skip
    asked = []
    monkeypatch.setattr(evaluate, "generate", lambda _l, items, mode, *_a, **_k: asked.append((items, mode)) or own)
    rows = own_reasoning_rows(loaded, cot)
    assert asked[0][1] is PromptMode.REASON and [i.image_path for i in asked[0][0]] == [r["image"] for r in cot]
    size = image_size(loaded.processor)
    assert [r["target"] for r in rows] == [
        build_target(cot[0]["answer"], tuple(model_box(cot[0], size)), "I see it at the top left."),
        build_target(cot[2]["answer"], tuple(model_box(cot[2], size)), "Something else."),
    ]
    assert {r["mode"] for r in rows} == {str(PromptMode.REASON)}
    frame_ids = {r["image_path"]: 7 + i for i, r in enumerate(rows)}
    every = collect_positions(loaded, rows, 2, frame_ids)
    positions = own_reasoning_positions(loaded, rows, 2, frame_ids)
    tokenizer = loaded.processor.tokenizer
    allowed = set(token_ids(tokenizer, ANSWERS + TAG_TOKENS))
    kept = set(positions.target.tolist())
    assert kept <= allowed and set(every.target.tolist()) - allowed  # the reasoning's own tokens are dropped
    assert len(positions.target) == sum(t in allowed for t in every.target.tolist())
    answer_tokens = set(tokenizer.encode(cot[0]["answer"], add_special_tokens=False))
    assert answer_tokens | {tokenizer.convert_tokens_to_ids("</answer>")} <= kept
    assert set(positions.frame.tolist()) == set(frame_ids.values())  # the ids given, shared with the other rows


def test_readout_refit_with_own_reasoning_fits_on_more_positions(micro, tmp_path, monkeypatch):
    """``own_reasoning``: the rows with the model's own reasoning add their answer and tag positions to the fit."""
    from surgery_r1_ros.training import evaluate
    from surgery_r1_ros.training.readout import refit_readout

    monkeypatch.setattr(evaluate, "generate", lambda _l, items, *_a, **_k: ["<think>It is there.</think>"] * len(items))
    plain = refit_readout(micro["model"], micro["mix"], tmp_path / "plain", questions=4, steps=5)
    own = refit_readout(micro["model"], micro["mix"], tmp_path / "own", questions=4, steps=5, own_reasoning=3)
    assert plain["own_reasoning_rows"] == 0 and own["own_reasoning_rows"] == 3
    # each own row adds <think>, </think>, <answer>, the answer's tokens, </answer>, <box> and </box> at least
    assert own["positions"] >= plain["positions"] + 3 * 7
    card = (tmp_path / "own" / "README.md").read_text()
    assert "answer and tag positions of 3 rows with the model's own reasoning" in card


# -- state probe ---------------------------------------------------------------------------------------------------


def test_state_probe_reads_just_before_the_state_is_given(micro):
    """The reasoning position ends where the state is first given away (the mix names it before its cue); the
    vector is the last token of that prefix."""
    from PIL import Image
    from surgery_r1_ros.training.state_probe import hidden_before_state, last_prefix_token, prefix_before_state

    from surgery_r1_ros.coherence import stated_state
    from surgery_r1_ros.data.cues import STATE_CUES
    from surgery_r1_ros.data.mix import read_mix
    from surgery_r1_ros.model import encode_prompt, load_model
    from surgery_r1_ros.protocol import PromptMode
    from surgery_r1_ros.vocab import STATES

    records = [r for r in read_mix(micro["mix"]) if r["kind"] == "cot" and r["answer"] in STATES][:3]
    assert records
    for record in records:
        mode, prefix = prefix_before_state(record, "reasoning")
        rest = ("<think>" + record["reasoning"])[len(prefix) :].lstrip()
        assert mode is PromptMode.REASON and stated_state(prefix) is None and stated_state(rest) == record["answer"]
        assert prefix_before_state(record, "answer") == (PromptMode.GROUND, "<answer>")
    cue = STATE_CUES[records[0]["answer"]][0]
    cue_first = {**records[0], "reasoning": f"Here {cue}, so it is {records[0]['answer']}."}
    assert prefix_before_state(cue_first, "reasoning") == (PromptMode.REASON, "<think>Here")  # a cue gives it away too
    assert prefix_before_state({**records[0], "reasoning": "Nothing about its tip."}, "reasoning") is None
    loaded = load_model(micro["model"])
    prefixes = [prefix_before_state(r, "reasoning")[1] for r in records] + ["<answer>"]
    images = [Image.open(r["image"]).convert("RGB") for r in records] * 2
    modes = [PromptMode.REASON] * len(records) + [PromptMode.GROUND]
    batch = encode_prompt(loaded.processor, images[: len(prefixes)], [r["question"] for r in records] + ["q?"],
                          modes, targets=prefixes)  # fmt: skip
    tokenizer = loaded.processor.tokenizer
    for row, (index, prefix) in enumerate(zip(last_prefix_token(batch).tolist(), prefixes, strict=True)):
        assert batch["input_ids"][row, index] == tokenizer.encode(prefix, add_special_tokens=False)[-1]
    batched, kept = hidden_before_state(loaded, records, "reasoning", batch_size=3)
    single, _ = hidden_before_state(loaded, records, "reasoning", batch_size=1)  # no padding
    assert len(kept) == len(records) and torch.allclose(batched, single, atol=1e-4)


def test_linear_probe_separates_what_is_there_and_not_what_is_not():
    from surgery_r1_ros.training.state_probe import fit_linear_probe

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    features = torch.randn(400, 16, generator=generator)
    features[:, :4] += 4.0 * torch.nn.functional.one_hot(labels, 4)  # the label is linearly readable
    features = features * 3.0 + 100.0  # far from standardised
    probe = fit_linear_probe(features[:300], labels[:300], 4)
    assert (probe(features[300:]).argmax(-1) == labels[300:]).float().mean() > 0.9
    shuffled = labels[torch.randperm(400, generator=generator)]
    blind = fit_linear_probe(features[:300, 4:], shuffled[:300], 4)  # neither the signal nor the right labels
    assert (blind(features[300:, 4:]).argmax(-1) == shuffled[300:]).float().mean() < 0.45


# -- last-layer refit ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_layer_model(micro, tmp_path_factory) -> Path:
    """The micro model with two decoder layers (the cache must hold the last one's input, not the embeddings)."""
    from surgery_r1_ros.data.mix import read_mix
    from surgery_r1_ros.model import build_builtin, save_model

    records = read_mix(micro["mix"])
    texts = [r["question"] for r in records] + [r["reasoning"] for r in records if r["reasoning"]]
    dims = {**MICRO_DIMS, "num_hidden_layers": 2}
    return save_model(build_builtin(texts, seed=1, **dims), tmp_path_factory.mktemp("two_layer") / "model")


def _cached_micro_rows(loaded, micro, questions: int):
    from surgery_r1_ros.training.dataset import load_records, sft_row
    from surgery_r1_ros.training.last_layer import cache_rows

    from surgery_r1_ros.model import image_size

    records = load_records(from_dict({"stage": "sft", "model": "x", "output_dir": "x",
                                      "data": {"mix": str(micro["mix"]), "kinds": ["grounding", "vqa", "cot"],
                                               "limit": questions}}).data)  # fmt: skip
    rows = [sft_row(r, image_size(loaded.processor)) for r in records]
    return rows, cache_rows(loaded, rows, batch_size=5)


def test_last_layer_loss_on_cached_inputs_is_the_models_own_loss(micro, two_layer_model):
    """Queries, attention output and MLP at the completion positions only, over cached inputs: the same
    cross-entropy as the model's full forward, also after the last layer's weights move."""
    from surgery_r1_ros.training.dataset import ImageCache, SFTCollator
    from surgery_r1_ros.training.last_layer import batch_loss, language_model

    from surgery_r1_ros.model import load_model

    loaded = load_model(two_layer_model)
    loaded.model.eval()
    rows, cached = _cached_micro_rows(loaded, micro, 6)
    ordered = sorted(rows, key=lambda r: r["image_path"])  # the cache's order
    batch = SFTCollator(loaded.processor, ImageCache())(ordered)
    every = list(range(len(rows)))
    with torch.no_grad():
        full = loaded.model(**batch).loss.item()
        assert batch_loss(loaded.model, cached, every).item() == pytest.approx(full, rel=1e-5)
        for p in language_model(loaded.model).layers[-1].parameters():  # a trained layer, not the init's
            p.add_(0.05 * torch.randn_like(p))
        moved = loaded.model(**batch).loss.item()
        assert batch_loss(loaded.model, cached, every).item() == pytest.approx(moved, rel=1e-5)
        language_model(loaded.model).layers[0].mlp.down_proj.weight.add_(1.0)  # below the cache: no effect on it
        assert batch_loss(loaded.model, cached, every).item() == pytest.approx(moved, rel=1e-5)


def test_last_layer_refit_lowers_held_out_loss_and_changes_only_the_last_layer(micro, two_layer_model, tmp_path):
    """`surgery-r1 train last-layer`: a plain model whose last decoder layer and final norm alone moved."""
    from surgery_r1_ros.training.last_layer import language_model

    from surgery_r1_ros.cli import main
    from surgery_r1_ros.model import load_model

    out = tmp_path / "last_layer"
    args = ["train", "last-layer", "--model", str(two_layer_model), "--mix", str(micro["mix"]), "--out", str(out)]
    assert main([*args, "--questions", "12", "--epochs", "6", "--lr", "3e-3"]) == 0
    result = json.loads((out / "surgery_r1.json").read_text())["last_layer"]
    assert result["best_step"] > 0 and result["held_loss_after"] < result["held_loss_before"]
    assert result["keep_boxes"]  # the default: box positions held to the model's own distribution
    before, after = load_model(two_layer_model).model, load_model(out).model
    lm = language_model(after)
    trained = {id(p) for p in [*lm.layers[-1].parameters(), *lm.norm.parameters()]}
    for (name, new), old in zip(after.named_parameters(), before.parameters(), strict=True):
        assert torch.equal(new, old) == (id(new) not in trained), name


def test_last_layer_box_attention_is_the_first_heads_attention_and_training_moves_it_onto_the_box(
    micro, two_layer_model, tmp_path
):
    """The first head's attention mass on the box, computed on cached inputs, equals the model's own (eager
    attention, ``box_attention_loss``); refit with ``--box-attention`` the head looks at the box far more."""
    from surgery_r1_ros.training.box_attention import box_attention_loss, captured_attention
    from surgery_r1_ros.training.dataset import ImageCache, SFTCollator
    from surgery_r1_ros.training.last_layer import batch_losses

    from surgery_r1_ros.cli import main
    from surgery_r1_ros.model import load_model

    loaded = load_model(two_layer_model, attn_implementation="eager")
    loaded.model.eval()
    rows, cached = _cached_micro_rows(loaded, micro, 6)
    ordered = sorted(rows, key=lambda r: r["image_path"])
    assert [len(k) > 0 for k in cached.box_keys] == [r["attend_box"] is not None for r in ordered]
    assert any(len(k) for k in cached.box_keys) and not all(len(k) for k in cached.box_keys)
    batch = SFTCollator(loaded.processor, ImageCache(), box_cells=True)(ordered)
    cells, box_from, labels = batch.pop("box_cells"), batch.pop("box_from"), batch.pop("labels")
    with torch.no_grad(), captured_attention(loaded.model) as weights:
        loaded.model(**batch)
        full_loss, full_mass = box_attention_loss(weights[-1:], batch["input_ids"], labels, cells, box_from,
                                                  loaded.model.config.image_token_id)  # fmt: skip
        _, loss, mass = batch_losses(loaded.model, cached, list(range(len(rows))), box_attention=True)
    assert mass == pytest.approx(full_mass, rel=1e-4) and loss.item() == pytest.approx(full_loss.item(), rel=1e-4)

    args = ["train", "last-layer", "--model", str(two_layer_model), "--mix", str(micro["mix"]), "--questions", "12",
            "--epochs", "20", "--lr", "1e-2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "attend"), "--box-attention", "1.0"]) == 0
    plain = json.loads((tmp_path / "plain" / "surgery_r1.json").read_text())["last_layer"]
    attend = json.loads((tmp_path / "attend" / "surgery_r1.json").read_text())["last_layer"]
    assert "box_attention_mass_after" not in plain and attend["box_attention"] == 1.0
    assert attend["box_attention_mass_after"] > 2 * attend["box_attention_mass_before"]
    assert attend["held_loss_after"] < attend["held_loss_before"]


def test_box_attention_can_be_kept_to_some_question_kinds():
    """``attend_only`` drops the box attention target of every other kind's rows and leaves the rest as they were."""
    from surgery_r1_ros.training.last_layer import attend_only

    box = [1.0, 2.0, 30.0, 40.0]
    rows = [{"question": q, "attend_box": box, "target": q} for q in
            ("What organ is being operated?", "What is the state of bipolar_forceps?",
             "Where is clip_applier located?")]  # fmt: skip
    kept = attend_only(rows, ["location"])
    assert [r["attend_box"] for r in kept] == [None, None, box]
    assert [r["target"] for r in kept] == [r["target"] for r in rows] and rows[0]["attend_box"] == box
    assert [r["attend_box"] for r in attend_only(rows, ["organ", "state"])] == [box, box, None]
    with pytest.raises(ValueError, match=r"\['tool'\] are not question kinds; use some of \['organ', 'state', 'loc"):
        attend_only(rows, ["tool", "state"])


def test_last_layer_refit_with_own_reasoning_learns_only_the_answer_and_tags_after_it(
    micro, two_layer_model, tmp_path, monkeypatch
):
    """A row of the model's own reasoning (``answer_only``) keeps only its answer-label and tag targets (the model
    wrote the rest); ``own_reasoning`` adds such rows to the refit."""
    from surgery_r1_ros.training import evaluate
    from surgery_r1_ros.training.last_layer import cache_rows, refit_last_layer
    from surgery_r1_ros.training.readout import answer_and_tag_ids

    from surgery_r1_ros.model import load_model
    from surgery_r1_ros.model.prompts import IGNORE_INDEX

    loaded = load_model(two_layer_model)
    loaded.model.eval()
    rows, cached = _cached_micro_rows(loaded, micro, 3)
    marked = cache_rows(loaded, [{**r, "answer_only": True} for r in rows], batch_size=5)
    allowed = set(answer_and_tag_ids(loaded.processor.tokenizer))
    dropped = 0
    for every, kept in zip(cached.targets, marked.targets, strict=True):
        due = every[every != IGNORE_INDEX].tolist()
        assert kept[kept != IGNORE_INDEX].tolist() == [t for t in due if t in allowed]
        dropped += len(due) - int((kept != IGNORE_INDEX).sum())
    assert dropped > 0
    monkeypatch.setattr(evaluate, "generate", lambda _l, items, *_a, **_k: ["<think>It is there.</think>"] * len(items))
    plain = refit_last_layer(two_layer_model, micro["mix"], tmp_path / "plain", questions=4, epochs=1)
    own = refit_last_layer(two_layer_model, micro["mix"], tmp_path / "own", questions=4, epochs=1, own_reasoning=3)
    assert (plain["own_reasoning_rows"], own["own_reasoning_rows"]) == (0, 3)
    assert own["rows"] == plain["rows"] + 3


def test_box_positions_run_from_after_the_open_tag_to_the_close_tag():
    from surgery_r1_ros.training.last_layer import box_positions

    open_, close = 5, 6
    targets = torch.tensor([1, 2, open_, 3, 4, 3, close, 9, open_, 4, close])
    expected = [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]
    assert box_positions(targets, (open_, close)).long().tolist() == expected
    assert box_positions(targets[None], (open_, close)).long().tolist() == [expected]  # batched rows


def test_kept_boxes_score_box_positions_against_the_models_own_distribution(micro, two_layer_model):
    """With ``box_teacher`` the loss is the label's cross-entropy off the box and the model's own entropy on it
    (its minimum there: the boxes GRPO shaped are kept, not refit to the label)."""
    from surgery_r1_ros.training.dataset import ImageCache, SFTCollator
    from surgery_r1_ros.training.last_layer import batch_loss, box_positions, box_teacher

    from surgery_r1_ros.model import load_model
    from surgery_r1_ros.model.prompts import IGNORE_INDEX

    loaded = load_model(two_layer_model)
    loaded.model.eval()
    rows, cached = _cached_micro_rows(loaded, micro, 6)
    tags = tuple(loaded.processor.tokenizer.convert_tokens_to_ids(["<box>", "</box>"]))
    kept = box_teacher(loaded.model, cached, tags)
    batch = SFTCollator(loaded.processor, ImageCache())(sorted(rows, key=lambda r: r["image_path"]))
    with torch.no_grad():
        log_probs = loaded.model(**batch).logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    due = targets != IGNORE_INDEX
    inside = due & box_positions(torch.where(due, targets, -1), tags)
    assert inside.sum() >= len(rows)  # grounding and reasoning rows have boxes
    label_ce = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    expected = torch.where(inside, entropy, label_ce)[due].mean().item()
    every = list(range(len(rows)))
    with torch.no_grad():
        assert batch_loss(loaded.model, kept, every).item() == pytest.approx(expected, rel=1e-4)
        assert batch_loss(loaded.model, cached, every).item() == pytest.approx(label_ce[due].mean().item(), rel=1e-4)


def test_refit_commands_pass_seed_and_box_attention_questions(monkeypatch, tmp_path):
    """``train readout`` / ``train last-layer`` hand their seed (and the last layer its box attention questions)
    to the refit."""
    from surgery_r1_ros.training import last_layer, readout

    from surgery_r1_ros.cli import main

    calls: dict[str, dict] = {}
    monkeypatch.setattr(readout, "refit_readout", lambda *a, **kw: calls.setdefault("readout", kw) and {})
    monkeypatch.setattr(last_layer, "refit_last_layer", lambda *a, **kw: calls.setdefault("last", kw) and {})
    common = ["--model", "builtin", "--mix", str(tmp_path / "mix.jsonl"), "--out", str(tmp_path / "out")]
    assert main(["train", "readout", *common, "--seed", "3"]) == 0
    assert main(["train", "last-layer", *common, "--seed", "4", "--box-attention", "0.5",
                 "--box-attention-questions", "location", "state"]) == 0  # fmt: skip
    assert calls["readout"]["seed"] == 3
    assert calls["last"]["seed"] == 4 and calls["last"]["box_attention_questions"] == ["location", "state"]
