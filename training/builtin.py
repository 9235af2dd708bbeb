"""Reproduce the built-in model from nothing: one command, every stage of the pipeline.

    surgery-r1 train builtin --out surgery_r1_ros/resources/builtin_model      # = make model

1. synthesize a train set and a held-out test set (different seeds, so unseen scenes),
2. write the training mix (VQA, grounding, chain of thought),
3. train a small BPE on the mix text and build a random-init Qwen2.5-VL normalised with the data's colours,
4. stage 0, vision pre-training: the vision tower learns the renderer's dense ground truth (what covers each
   image token's cell, which tool's tip is there and in what state, where the cell is) with a training-only
   head (``vision_pretrain.py``), the part a real Qwen2.5-VL brings from its own pre-training,
5. SFT in phases (a curriculum: short grounding/VQA targets first, then chain of thought added), the vision
   tower frozen, each phase gated on image reliance (it fails loudly when the frame stops mattering),
6. GRPO from the SFT result,
7. the readout refit: the output head's answer, tag, name and state rows fitted to the last hidden states
   (``readout.py``),
   then, where the config has a ``last_layer`` block, the language model's last layer refit (``last_layer.py``)
   and, with ``readout_again: true``, the readout refit once more on that layer,
8. evaluate untrained (direct only) / SFT / SFT+GRPO / the refits on the test split (direct and reasoning), the final
   model also with frames swapped across sequences and with degraded frames, and measure how much each stage
   relies on the image (test loss with true vs shuffled frames),
9. install the final weights in ``--out`` in place and write its model card.

Stages record completion in ``<work>/stages.json``; ``--resume`` skips finished ones and resumes the
current training stage from its last checkpoint. Knobs live in ``training/configs/builtin_pipeline.yaml``.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from .config import find_config, from_dict

log = logging.getLogger(__name__)


REPORTED = (
    "n",
    "accuracy",
    "accuracy_by_kind",
    "state_by_subject",
    "f_score",
    "miou_legacy",
    "miou",
    "coherence_rate",
    "format_rate",
    "claims_rate",
    "claimed_coherence_rate",
    "true_claims_rate",
    "subject_rate",
    "state_claims_rate",
    "state_claim_accuracy",
    "state_agreement_rate",
    "seconds",
)


@dataclass(frozen=True)
class Refit:
    """A refit after GRPO: its stage (and work folder) name, the YAML block that holds its settings (a repeat
    reuses an earlier refit's block) and its name in the model card's tables."""

    name: str
    block: str
    label: str

    @property
    def step(self) -> str:
        """Its name in the installed model's pipeline record."""
        return self.block.replace("_", " ")

    def asked(self, spec: dict[str, Any]) -> bool:
        """Whether the pipeline YAML asks for it: its block is there (even empty: the defaults), or, for a
        repeat, its flag is true."""
        return self.name in spec if self.name == self.block else bool(spec.get(self.name))


# The refits after GRPO, in the order they run, each on the model the one before made: the readout rows first,
# then the last layer learns to feed them, then the rows are refit to the new layer (README: both orders measured).
# One runs when the YAML asks for it (``Refit.asked``): its block, or ``readout_again: true``.
REFITS = (Refit("readout", "readout", "readout refit"), Refit("last_layer", "last_layer", "last-layer refit"),
          Refit("readout_again", "readout", "readout refit again"))  # fmt: skip
TRAINING_STAGES = ("vision", "sft_a", "sft_b", "rft")
FINAL_STAGES = ("rft", *(r.name for r in REFITS))  # the installed model: the last of these that ran
PIPELINE_STEPS = {"synth": "synth", "mix": "mix", "vision": "vision pre-training", "sft_b": "SFT", "rft": "GRPO",
                  **{r.name: r.step for r in REFITS}}  # fmt: skip


def refit_function(block: str):
    """The function a refit block's settings go to (imported on use: it pulls in the model code)."""
    if block == "readout":
        from .readout import refit_readout

        return refit_readout
    from .last_layer import refit_last_layer

    return refit_last_layer


class TimeBudget(TrainerCallback):
    """Stop (and save) a training stage once it has run ``seconds``; the stage then ends normally."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.started = time.time()
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds and time.time() - self.started > self.seconds:
            control.should_training_stop = True
            control.should_save = True
            self.stopped_at = state.global_step
        return control


class Pipeline:
    """The stages, their bookkeeping (``stages.json``) and the measured numbers for the model card."""

    def __init__(self, out: Path, work: Path, spec: dict[str, Any], resume: bool) -> None:
        self.out, self.work, self.spec, self.resume = Path(out), Path(work), spec, resume
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_file = self.work / "stages.json"
        resuming = resume and self.state_file.is_file()
        self.state: dict[str, Any] = json.loads(self.state_file.read_text()) if resuming else {}
        self.train_data = self.work / "data" / "train"
        self.test_data = self.work / "data" / "test"
        self.mix = self.work / "data" / "train_mix.jsonl"

    def stage(self, name: str, fn) -> Any:
        if name in self.state and self.state[name].get("done"):
            log.info("stage %s: done before, skipped", name)
            return self.state[name].get("result")
        log.info("stage %s: starting", name)
        started = time.time()
        result = fn()
        self.state[name] = {"done": True, "seconds": round(time.time() - started, 1), "result": result}
        self.state_file.write_text(json.dumps(self.state, indent=2) + "\n")
        log.info("stage %s: done in %.0f s", name, time.time() - started)
        return result

    # -- stages -------------------------------------------------------------------------------------------
    def synth(self) -> dict:
        from surgery_r1_ros.boxes import parse_size
        from surgery_r1_ros.data.synth import SynthOptions, generate_dataset

        out = {}
        for name, folder in (("train", self.train_data), ("test", self.test_data)):
            opts = dict(self.spec["synth"][name])
            size = parse_size(opts.pop("size"))
            workers = int(opts.pop("workers", 2))
            if folder.exists():
                shutil.rmtree(folder)
            report = generate_dataset(folder, SynthOptions(size=size, **opts), workers=workers)
            out[name] = {**opts, "size": list(size), "summary": report.summary()}
        return out

    def write_mix(self) -> dict:
        from surgery_r1_ros.data.mix import build_mix, format_mix_counts, write_mix
        from surgery_r1_ros.data.vqla import load_vqla

        dataset = load_vqla(self.train_data, "all")
        records = build_mix(dataset, seed=int(self.spec.get("seed", 0)))
        write_mix(records, self.mix)
        test = load_vqla(self.test_data, "all")
        return {
            "train_frames": len(dataset.frames),
            "train_questions": len(dataset),
            "records": len(records),
            "test_frames": len(test.frames),
            "test_questions": len(test),
            "counts": format_mix_counts(records),
        }

    def init_model(self) -> dict:
        from surgery_r1_ros import protocol
        from surgery_r1_ros.data.mix import read_mix
        from surgery_r1_ros.model import build_builtin, save_model

        from .dataset import dataset_colour_stats, frames_of

        spec = self.spec["model"]
        records = read_mix(self.mix)
        dims = dict(spec.get("dims") or {})
        size = (int(dims.get("image_width", 280)), int(dims.get("image_height", 224)))
        mean, std = dataset_colour_stats(frames_of(records), size)
        texts = [r["question"] for r in records] + [
            protocol.build_target(r["answer"], tuple(r["box"]) if r["box"] else None, r["reasoning"]) for r in records
        ]
        loaded = build_builtin(texts, mean, std, seed=int(self.spec.get("seed", 0)), **dims)
        folder = self.work / "init"
        save_model(loaded, folder, {"trained": False, "note": "random init of the built-in pipeline"})
        params = sum(p.numel() for p in loaded.model.parameters())
        return {"folder": str(folder), "image_mean": mean, "image_std": std, "parameters": params,
                "vocab": len(loaded.processor.tokenizer), "dims": dims}  # fmt: skip

    def _stage_folder(self, name: str, spec: dict) -> tuple[Path, bool, TimeBudget]:
        """A training stage's output folder (cleared unless resuming), whether to resume, and its time budget.

        Pops ``time_budget_minutes`` from ``spec``.
        """
        budget = spec.pop("time_budget_minutes", None)
        folder = self.work / name
        resume = self.resume and folder.is_dir()
        if not resume and folder.exists():
            shutil.rmtree(folder)
        return folder, resume, TimeBudget(budget * 60 if budget else None)

    def pretrain_vision(self, model: str, spec: dict) -> dict:
        from .vision_pretrain import run_vision_pretrain

        spec = dict(spec)
        folder, resume, timer = self._stage_folder("vision", spec)
        result = run_vision_pretrain(model, self.train_data, self.test_data, folder, dict(spec.get("trainer") or {}),
                                     resume=resume, callbacks=[timer], seed=int(self.spec.get("seed", 0)))  # fmt: skip
        return {**result, "stopped_by_time": timer.stopped_at, "config": spec}

    def train(self, name: str, stage: str, model: str, spec: dict) -> dict:
        spec = dict(spec)
        folder, resume, timer = self._stage_folder(name, spec)
        min_gap = spec.pop("min_reliance_gap", None)
        config = stage_config(name, stage, model, folder, self.mix, spec)
        if stage == "sft":
            from .sft import run_sft

            final = run_sft(config, resume=resume, callbacks=[timer])
        else:
            from .rft import run_rft

            final = run_rft(config, resume=resume, callbacks=[timer])
        trainer_state = _last_state(folder)
        result = {"final": str(final), "steps": trainer_state.get("global_step"), "stopped_by_time": timer.stopped_at,
                  "config": config.to_dict()}  # fmt: skip
        if min_gap is not None:
            from .reliance import require_reliance

            result["reliance"] = require_reliance(final, self.test_records, float(min_gap), stage=name)
        return result

    @functools.cached_property
    def test_records(self) -> list[dict]:
        """The held-out split as mix records (for the image-reliance measurements; built once)."""
        from surgery_r1_ros.data.mix import build_mix
        from surgery_r1_ros.data.vqla import load_vqla

        return build_mix(load_vqla(self.test_data, "all"), seed=int(self.spec.get("seed", 0)))

    def evaluate(self, models: dict[str, str], final: str) -> dict:
        """Every model in both modes on the test split (the untrained one in direct mode only: a random-init model
        never closes a tag, so its reasoning measures nothing); ``final`` also on swapped and degraded frames."""
        from .evaluate import FRAME_VARIANTS, evaluate, summary

        spec = self.spec.get("eval", {})
        results: dict[str, Any] = {}
        runs = [(label, folder, reasoning, "own") for label, folder in models.items()
                for reasoning in ((False,) if label == "untrained" else (False, True))]  # fmt: skip
        runs += [(final, models[final], False, variant) for variant in FRAME_VARIANTS if variant != "own"]
        for label, folder, reasoning, frames in runs:
            mode = "reason" if reasoning else "direct"
            key = f"{label}/{mode}" + ("" if frames == "own" else f"/{frames}")
            out = self.work / "eval" / label / (mode if frames == "own" else f"{mode}_{frames}")
            limit = spec.get("reason_max_new_tokens") if reasoning else None
            if label == "untrained":
                limit = spec.get("untrained_max_new_tokens", limit)
            report = evaluate(
                folder, self.test_data, "all", out, reasoning=reasoning,
                batch_size=int(spec.get("batch_size", 32)), max_new_tokens=limit,
                limit=spec.get("reason_limit") if reasoning else None, frames=frames,
            )  # fmt: skip
            log.info("%s: %s", key, summary(report))
            results[key] = {k: report[k] for k in REPORTED if k in report}
            results[key]["report"] = str(out / "report.json")
        return results

    def refit(self, refit: Refit, model: str) -> dict:
        """One of ``REFITS``, from ``model``, with its block's settings (training/readout.py, last_layer.py)."""
        folder = self.work / refit.name
        fit = refit_function(refit.block)
        settings = self.spec[refit.block] or {}
        result = fit(model, self.mix, folder, seed=int(self.spec.get("seed", 0)), **settings)
        return {"final": str(folder), **result}

    def reliance(self, models: dict[str, str]) -> dict:
        """Teacher-forced loss on the test split with true vs shuffled frames (training/reliance.py)."""
        from .reliance import image_reliance

        records = self.test_records
        return {label: image_reliance(folder, records) for label, folder in models.items()}

    def install(self) -> dict:
        from surgery_r1_ros.model import load_model, save_model

        last = [stage for stage in FINAL_STAGES if stage in self.state][-1]
        loaded = load_model(self.state[last]["result"]["final"])
        steps = [label for stage, label in PIPELINE_STEPS.items() if stage in self.state]
        info = {
            "trained": True,
            "kind": "builtin",
            "pipeline": "surgery-r1 train builtin (" + " -> ".join(steps) + ")",
            "metrics": self.state.get("eval", {}).get("result", {}),
        }
        save_model(loaded, self.out, info)
        # Learning curves travel with the weights as text (the only binary in git is the model itself);
        # the plots stay in <work>/<stage>/ (loss.png, rewards.png).
        for stage in TRAINING_STAGES:
            src = self.work / stage / "metrics.csv"
            if src.is_file():
                shutil.copy(src, self.out / f"{stage}_metrics.csv")
        return {"out": str(self.out)}


def stage_config(name: str, stage: str, model: str, folder: Path, mix: Path, spec: dict):
    """A training stage's ``RunConfig`` from its pipeline block (without the pipeline-only keys)."""
    raw = {"stage": stage, "model": model, "output_dir": str(folder), **spec,
           "data": {"mix": str(mix), **(spec.get("data") or {})}}  # fmt: skip
    return from_dict(raw, source=f"builtin_pipeline:{name}")


# The YAML keys each block may hold besides those a called function declares (checked before any stage runs).
TOP_LEVEL = {"seed", "synth", "model", "vision", "sft_a", "sft_b", "rft", "eval", *(r.name for r in REFITS)}
EVAL_KEYS = {"batch_size", "reason_max_new_tokens", "reason_limit", "untrained_max_new_tokens"}
PIPELINE_ONLY = {"time_budget_minutes", "min_reliance_gap"}


def check_spec(spec: dict[str, Any], source: str) -> None:
    """Fail on a mistyped or misplaced key before the first stage, not when its stage starts an hour later."""
    import inspect

    from .config import check_keys

    check_keys(source, spec, TOP_LEVEL)
    for refit in REFITS:
        if refit.asked(spec) and refit.block not in spec:
            raise ValueError(f"{source}: {refit.name} repeats the {refit.block} block's refit: it needs that block")
    check_keys(f"{source} eval", spec.get("eval") or {}, EVAL_KEYS)
    check_keys(f"{source} vision", spec.get("vision") or {}, {"time_budget_minutes", "trainer"})
    for block in dict.fromkeys(r.block for r in REFITS):
        arguments = set(inspect.signature(refit_function(block)).parameters) - {"model", "mix", "out", "seed"}
        check_keys(f"{source} {block}", spec.get(block) or {}, arguments)
    for name, stage in (("sft_a", "sft"), ("sft_b", "sft"), ("rft", "rft")):
        if name in spec:
            block = {k: v for k, v in spec[name].items() if k not in PIPELINE_ONLY}
            stage_config(name, stage, "<start model>", Path("<work>") / name, Path("<mix>"), block)


def _last_state(folder: Path) -> dict:
    states = sorted(folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    return json.loads(states[-1].read_text()) if states else {}


def run_builtin(out: str | Path, work: str | Path, config: str = "builtin_pipeline", resume: bool = False) -> Path:
    """Run every stage; returns the model card path."""
    path = find_config(config)
    spec = yaml.safe_load(path.read_text())
    check_spec(spec, str(path))
    p = Pipeline(Path(out), Path(work), spec, resume)
    p.stage("synth", p.synth)
    p.stage("mix", p.write_mix)
    init = p.stage("init", p.init_model)
    model = init["folder"]
    models = {"untrained": model}
    if "vision" in spec:
        model = p.stage("vision", lambda: p.pretrain_vision(init["folder"], spec["vision"]))["final"]
        models["vision"] = model
    for phase in ("sft_a", "sft_b"):
        if phase in spec:
            model = p.stage(phase, lambda ph=phase, m=model: p.train(ph, "sft", m, spec[ph]))["final"]
    sft_final = model
    rft = p.stage("rft", lambda: p.train("rft", "rft", sft_final, spec["rft"]))
    answering = {"untrained": init["folder"], "sft": sft_final, "sft_grpo": rft["final"]}
    for refit in REFITS:
        if refit.asked(spec):
            start = list(answering.values())[-1]
            answering[refit.name] = p.stage(refit.name, lambda r=refit, m=start: p.refit(r, m))["final"]
    final = list(answering)[-1]
    p.stage("eval", lambda: p.evaluate(answering, final=final))
    p.stage("reliance", lambda: p.reliance({**models, **answering}))
    p.stage("install", p.install)
    return write_model_card(p, path)


def write_model_card(p: Pipeline, config_path: Path) -> Path:
    """README.md beside the weights: data, model, steps, time, the measured table, how to reproduce."""
    from .card import model_card

    text = model_card(p.state, p.spec, config_path, platform.platform())
    card = p.out / "README.md"
    card.write_text(text)
    return card
