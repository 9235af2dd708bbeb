"""ONNX export of the built-in model, its parity with torch, and the onnxruntime backend."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from surgery_r1_ros.export.onnx_export import load_for_export, onnx_sha256
from surgery_r1_ros.export.parity import check_parity

from surgery_r1_ros.engine import Engine, EngineError
from surgery_r1_ros.engine.artifacts import MANIFEST, load_manifest, onnx_cache_dir, onnx_export_for
from surgery_r1_ros.engine.onnxruntime_backend import PREFERRED_PROVIDERS, choose_providers
from surgery_r1_ros.model import BUILTIN_MODEL_DIR, build_builtin, load_model, save_model
from surgery_r1_ros.protocol import PromptMode

QUESTION = "Where is bipolar_forceps located?"


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """One export cache for the test session (test_bench reuses the built-in model's export)."""
    root = tmp_path_factory.getbasetemp() / "onnx_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURGERY_R1_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def onnx_dir(onnx_cache) -> Path:
    return onnx_export_for(None)


def _image(seed: int = 0, w: int = 640, h: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_manifest_describes_the_exported_graphs(onnx_dir):
    manifest = load_manifest(onnx_dir)
    width, height = load_model(BUILTIN_MODEL_DIR).info["image_size"]
    assert manifest["image_size"] == [width, height]
    assert manifest["image_grid_thw"] == [1, height // 14, width // 14]  # 14 px patches
    assert manifest["num_image_tokens"] == (height // 28) * (width // 28)  # 2x2 patches merge into one token
    assert manifest["opset"] == 17 and len(manifest["model_config_sha256"]) == 64
    text = manifest["text"]
    for part in ("vision", "decoder"):
        graph = onnx.load(str(onnx_dir / manifest["files"][part]), load_external_data=False).graph
        assert [i.name for i in graph.input] == [s["name"] for s in manifest[part]["inputs"]]
        assert [o.name for o in graph.output] == [s["name"] for s in manifest[part]["outputs"]]
        assert manifest["sha256"][manifest["files"][part]] == onnx_sha256(onnx_dir / manifest["files"][part])
    assert len(manifest["decoder"]["past_names"]) == 2 * text["num_layers"]
    assert manifest["decoder"]["inputs"][2] == {"name": "position_ids", "shape": [3, 1, "seq"], "dtype": "int64"}
    embeddings = np.load(onnx_dir / manifest["files"]["embeddings"])
    assert embeddings.shape == (text["vocab_size"], text["hidden_size"])
    assert (onnx_dir / "processor" / "tokenizer.json").is_file()


def test_parity_with_torch_on_the_builtin_model(onnx_dir):
    result = check_parity(onnx_dir, images=1, questions=(QUESTION,), max_new_tokens=6)  # direct and reasoning
    print(f"builtin parity: max |logit diff| {result['max_abs_logit_diff']:.3g}, "
          f"max |image embeds diff| {result['max_abs_image_embeds_diff']:.3g}")  # fmt: skip
    assert result["passed"], result
    assert result["max_abs_logit_diff"] < 1e-3
    assert result["answers_identical"]
    assert load_manifest(onnx_dir)["parity"]["passed"] is True


def test_parity_gives_identical_varied_answers_on_a_sharpened_model(tmp_path, monkeypatch, caplog):
    """Parity on answers that differ between images: a random-init model of the built-in architecture with
    scaled-up weights (the trained built-in model answers from the text prior, the same for every image).
    Exported the way the runtime does it: one logged step that names the cache folder, then reused."""
    loaded = build_builtin(["Where is bipolar_forceps located?"], seed=1)
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.ndim == 2:
                param.mul_(4.0)
    folder = save_model(loaded, tmp_path / "sharp")
    monkeypatch.setenv("SURGERY_R1_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="surgery_r1_ros.engine.artifacts"):
        exported = onnx_export_for(folder)
        assert exported == onnx_cache_dir(folder) and exported.parent == tmp_path / "cache" / "onnx"
        assert f"the result is cached in {exported}" in caplog.text and "exporting" in caplog.text
        caplog.clear()
        assert onnx_export_for(folder) == exported
        assert "exporting" not in caplog.text and f"using the cached ONNX export of {folder}" in caplog.text
    (folder / "README.md").write_text("# my fine-tuned model\n")  # a new model card: the same export
    (folder / "sft_metrics.csv").write_text("step,loss\n")
    assert onnx_cache_dir(folder) == exported
    config = folder / "config.json"
    config.write_text(config.read_text() + "\n")  # the model itself changed: a new export
    assert onnx_cache_dir(folder) != exported
    result = check_parity(exported, folder, images=2, questions=(QUESTION,), modes=(PromptMode.GROUND,),
                          max_new_tokens=8)  # fmt: skip
    print(
        f"sharpened parity: max |logit diff| {result['max_abs_logit_diff']:.3g}, {result['distinct_answers']} answers"
    )
    assert result["distinct_answers"] > 1
    assert result["answers_identical"] and result["passed"], result


def test_engine_answers_in_both_modes_on_onnxruntime(onnx_dir):
    engine = Engine(onnx_dir, backend="onnxruntime", device="cpu", max_new_tokens=6)
    try:
        assert engine.backend.active_providers == ["CPUExecutionProvider"]
        assert engine.backend.decoder.get_session_options().intra_op_num_threads == 1  # a small model on CPU
        engine.encode(_image(1), stamp=7)
        first = engine.ask(QUESTION, stamp=7)
        again = engine.ask(QUESTION, stamp=7)  # the cached frame state is not modified by an ask
        reasoned = engine.ask(QUESTION, stamp=7, reasoning=True)
        assert first.text == again.text and first.new_tokens == again.new_tokens
        assert reasoned.mode == "reason" and first.mode == "ground"
        for key in ("prefill_ms", "decode_ms", "decode_ms_per_token", "total_ms"):
            assert key in first.timings
        with pytest.raises(EngineError, match="fixed grid"):
            engine.backend.encode_frame(np.zeros((4, 1176), np.float32), [1, 2, 2], [1, 2, 3])
    finally:
        engine.close()


def test_auto_backend_is_onnxruntime_on_cpu_and_falls_back_to_torch(onnx_dir, monkeypatch, caplog):
    """The node's default: the fastest measured backend (onnxruntime on CPU, from the cached export)."""
    from surgery_r1_ros.engine import onnxruntime_backend, open_engine
    from surgery_r1_ros.engine.backends import default_backend

    assert default_backend("cpu") == "onnxruntime" and default_backend("cuda:1") == "torch"
    engine = open_engine(None, "auto", "cpu", max_new_tokens=2)
    assert engine.backend.name == "onnxruntime" and engine.backend.onnx_dir == onnx_dir
    engine.close()

    def cannot_export(*_args, **_kwargs):
        raise RuntimeError("torch.onnx cannot trace this model")

    monkeypatch.setattr(onnxruntime_backend, "create", cannot_export)
    with caplog.at_level(logging.WARNING):
        engine = open_engine(None, "auto", "cpu", max_new_tokens=2)
    assert engine.backend.name == "torch"
    assert "onnxruntime is not usable for this model" in caplog.text and "cannot trace" in caplog.text


def test_choose_providers_prefers_tensorrt_then_cuda_then_cpu():
    everything = [
        "CPUExecutionProvider",
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "AzureExecutionProvider",
    ]
    assert choose_providers(available=everything) == list(PREFERRED_PROVIDERS)
    assert choose_providers(available=["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(device="cpu", available=everything) == ["CPUExecutionProvider"]
    assert choose_providers(device="cuda:0", available=everything) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("CUDAExecutionProvider,CPUExecutionProvider", available=everything)[0].startswith("CUDA")
    with pytest.raises(EngineError, match="not available"):
        choose_providers(["CUDAExecutionProvider"], available=["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        choose_providers(device="cuda", available=["CPUExecutionProvider"])


def test_export_is_cached_by_model_folder(onnx_dir, tmp_path):
    stamp = os.stat(onnx_dir / MANIFEST).st_mtime_ns
    assert onnx_export_for(None) == onnx_dir  # same folder, not exported again
    assert onnx_export_for(onnx_dir) == onnx_dir  # an export folder is used as it is
    assert os.stat(onnx_dir / MANIFEST).st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match="not an ONNX export folder"):
        load_manifest(tmp_path)


def test_the_runtime_reads_a_cached_export_without_torch_onnx_or_export_tooling(onnx_dir, onnx_cache):
    """Artifacts are read by a torch-free module; an engine on a cached export never imports surgery_r1_ros.export."""
    code = (
        "import sys\n"
        "import surgery_r1_ros.engine.artifacts\n"
        "assert 'torch' not in sys.modules, 'the artifact module imported torch'\n"
        "from surgery_r1_ros.engine import open_engine\n"
        "engine = open_engine(None, 'onnxruntime', 'cpu', max_new_tokens=2)\n"
        "import numpy as np\n"
        "engine.ask('What organ is being operated?', image=np.zeros((64, 80, 3), np.uint8))\n"
        "print(sorted(m for m in sys.modules if m.startswith('surgery_r1_ros.export') or m == 'onnx'))\n"
    )
    env = {**os.environ, "SURGERY_R1_CACHE": str(onnx_cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_lora_adapter_is_merged_before_export(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(BUILTIN_MODEL_DIR)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    peft_model = get_peft_model(base.model, config)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(BUILTIN_MODEL_DIR)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    expected = peft_model.merge_and_unload()

    merged = load_for_export(adapter)
    names = [n for n, _ in merged.model.named_modules()]
    assert not any("lora" in n for n in names)
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    got = dict(merged.model.named_parameters())[weight]
    assert torch.allclose(got, dict(expected.named_parameters())[weight])
    assert not torch.allclose(got, dict(load_model(BUILTIN_MODEL_DIR).model.named_parameters())[weight])
