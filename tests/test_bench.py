"""The benchmark runs end to end and writes its keys (no timing assertions: CI machines vary)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from surgery_r1_ros.bench import BenchSettings, format_table, speedups, stats
from surgery_r1_ros.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Where is suction located?"
METRICS = ("preprocess_new_frame_ms", "preprocess_ms", "vision_encode_ms", "prefix_prefill_ms", "question_prefill_ms",
           "decode_ms_per_token", "ask_direct_ms", "ask_reasoning_ms", "cold_ask_direct_ms")  # fmt: skip


@pytest.fixture
def onnx_cache(tmp_path_factory, monkeypatch):
    """The export cache shared with test_export (the built-in model is exported once per session)."""
    monkeypatch.setenv("SURGERY_R1_CACHE", str(tmp_path_factory.getbasetemp() / "onnx_cache"))


def test_bench_cli_times_every_backend_and_the_naive_baseline(onnx_cache, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--out", str(out), "--backends", "torch", "onnxruntime", "tensorrt", "--device", "cpu",
            "--images", "1", "--repeats", "1", "--warmup", "0", "--direct-tokens", "2", "--reasoning-tokens", "3",
            "--questions", QUESTION]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    for name in ("torch", "onnxruntime"):
        entry = result["backends"][name]
        assert entry["available"] is True
        assert set(METRICS) <= set(entry["stats"])
        assert {"p50", "p95", "n"} <= set(entry["stats"]["ask_direct_ms"])
        assert entry["stats"]["preprocess_new_frame_ms"]["n"] == 100
        assert entry["new_tokens"] == {"direct": [2], "reasoning": [3]}  # fixed output length
        assert set(entry["speedup_vs_naive"]) == {"direct", "reasoning", "direct_including_frame_encode"}
    assert result["backends"]["tensorrt"]["available"] is False
    assert "TensorRT is not installed" in result["backends"]["tensorrt"]["error"]
    naive = result["naive"]
    assert naive["new_tokens"] == {"direct": [2], "reasoning": [3]}
    assert set(naive["stats"]) == {"ask_direct_ms", "ask_reasoning_ms"}
    assert result["settings"]["fixed_length"] is True and "min_new_tokens" in result["fixed_output_length_note"]
    assert set(result["headline"]) == {"torch", "onnxruntime"}
    assert result["machine"]["cpu_count"] >= 1
    printed = capsys.readouterr().out
    assert "naive HF generate" in printed and "decode (ms/token)" in printed


def test_stats_speedups_and_table():
    s = stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["p50"] == 3.0 and s["n"] == 5 and 4.0 < s["p95"] <= 100.0
    assert stats([])["p50"] is None
    engine = {"ask_direct_ms": {"p50": 10.0}, "ask_reasoning_ms": {"p50": 40.0}, "cold_ask_direct_ms": {"p50": 50.0}}
    naive = {"ask_direct_ms": {"p50": 100.0}, "ask_reasoning_ms": {"p50": 200.0}}
    assert speedups(engine, naive) == {"direct": 10.0, "reasoning": 5.0, "direct_including_frame_encode": 2.0}
    with pytest.raises(ValueError):
        BenchSettings(repeats=0)
    table = format_table({
        "backends": {"x": {"available": True, "stats": {"ask_direct_ms": {"p50": 1.0, "p95": 2.0}},
                           "speedup_vs_naive": {"direct": 3.0, "reasoning": 2.0, "direct_including_frame_encode": 1.0}},
                     "y": {"available": False, "error": "missing"}},
        "settings": {"repeats": 1, "images": 1, "questions": ["q"], "direct_tokens": 2, "reasoning_tokens": 3,
                     "fixed_length": True},
    })  # fmt: skip
    assert "1.00 / 2.00" in table and "3.0x faster" in table and "y: not available" in table


def test_gpu_script_runs_end_to_end_on_cpu_with_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_qwen25vl_3b", ROOT / "benchmarks" / "gpu_qwen25vl_3b.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "gpu.json"
    result = script.main(["--tiny", "--out", str(out), "--direct-tokens", "2", "--reasoning-tokens", "3"])
    written = json.loads(out.read_text())
    assert written["gpu_script"]["architecture"] == "tiny"
    assert written["gpu_script"]["engine_vs_generate"]["first_token_ok"] is True
    floor = written["gpu_script"]["decode_floor"]
    assert floor["floor_ms_per_token"] > 0 and floor["weight_bytes"] > 0
    targets = written["gpu_script"]["targets"]["torch"]
    assert {"decode_over_floor", "ask_direct_p50_ms", "speedup_direct_vs_naive"} <= set(targets)
    assert result["backends"]["torch"]["available"] is True
    assert "naive HF generate" in capsys.readouterr().out
    # the full-size configuration is what the GPU run builds
    assert script.QWEN25_VL_3B["text"]["num_hidden_layers"] == 36 and script.IMAGE_SIZE == 448
