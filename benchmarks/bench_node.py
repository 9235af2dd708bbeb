"""What the ROS node adds to the engine's latency, with 1280x1024 frames streaming at 30 Hz, per executor design.

    .venv/bin/python benchmarks/bench_node.py                     # built-in model and scripted engine
    .venv/bin/python benchmarks/bench_node.py --engines scripted  # executor overhead only (seconds)

For each engine (the built-in model on the onnxruntime backend, the CPU default, and on torch; a scripted
engine that answers in a fixed ~20 ms), each executor design (``single``: one thread spins the executor,
a worker thread runs the model; ``multi``: the same node under rclpy's MultiThreadedExecutor) and each
place of the model (``engine_process`` on: its own process, the default; off: the node's process):

1. the node in its own process and a camera process streaming 1280x1024 rgb8 at 30 Hz into it;
2. the engine alone, in this process, while that runs: ``engine.ask`` on a fresh 1280x1024 frame (what
   the node does for a question about the newest frame), QUESTIONS times, paced as in 3 -> direct p50/p95;
3. the same questions through the node, ~PACE_S apart (stamp 0: the newest frame) -> service round trip
   p50/p95, the engine time the node measured inside (inference_ms), and frames delivered to the node.

"adds" = service p50 - direct p50, both measured while the camera streams into the node; "outside
engine" = round trip - the engine time the node measured, per call, split into the part inside the node
(request received to response filled, less the engine: waiting for an encode ahead, the hand-off to the
worker and back) and the transport (DDS both ways, the executors picking the messages up).
Writes benchmarks/results/node_latency.json. DDS stays on this machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # fake_engines (scripted engine) and fake_camera live with the tests

from surgery_r1_ros.bag.ros_env import clean_shm, safe_dds, shm_snapshot, start_process, stop_process  # noqa: E402

# knobs
WIDTH, HEIGHT, RATE = 1280, 1024, 30.0
QUESTIONS = 30
WARMUP_QUESTIONS = 3
PACE_S = 0.3  # pause between questions: they land at random points of the frame stream, as an operator's would
MAX_NEW_TOKENS = 8  # bounds the built-in model's decoding so the numbers are about the node, not the text length
QUESTION = "Where is bipolar_forceps located?"
ENGINES = {"onnxruntime": "onnxruntime", "torch": "torch", "scripted": "fake_engines:ScriptedEngine"}
EXECUTORS = ("single", "multi")
OUT = ROOT / "benchmarks" / "results" / "node_latency.json"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(values: list[float]) -> dict:
    return {
        "p50_ms": round(pct(values, 50), 2),
        "p95_ms": round(pct(values, 95), 2),
        "max_ms": round(max(values), 2) if values else None,
        "n": len(values),
    }


def frame(i: int) -> np.ndarray:
    img = np.full((HEIGHT, WIDTH, 3), (180, 90, 80), np.uint8)
    x = (i * 97) % (WIDTH - 64)
    img[100:164, x : x + 64] = 255
    return img


def make_engine(backend: str):
    from surgery_r1_ros.engine import open_engine

    return open_engine(None, backend, "cpu")


def direct_engine(engine, questions: int) -> dict:
    """engine.ask on a new 1280x1024 frame each time, in this process (what the node does per question),
    paced like the questions through the node: back to back, the model's weights stay in the CPU caches,
    while between paced questions the 30 Hz frames flush them (~4 MB each), so unpaced timings read faster."""
    times = []
    for i in range(WARMUP_QUESTIONS + questions):
        image = frame(i)
        time.sleep(PACE_S * (0.5 + np.random.random()))
        start = time.perf_counter()
        engine.ask(QUESTION, image=image, stamp=("bench", i), max_new_tokens=MAX_NEW_TOKENS)
        if i >= WARMUP_QUESTIONS:
            times.append((time.perf_counter() - start) * 1000.0)
        forget = getattr(engine, "forget", None)
        if callable(forget):
            forget()
    return summary(times)


def through_node(
    backend: str,
    engine,
    executor: str,
    questions: int,
    env: dict,
    log_dir: Path,
    encode_ahead: bool = True,
    engine_process: bool = True,
) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    from surgery_r1_interfaces.srv import AskQuestion

    topic = "/bench_rig/left/image_raw"
    params = {
        "backend": backend,
        "device": "cpu",
        "executor": executor,
        "image_topic": topic,
        "max_new_tokens": MAX_NEW_TOKENS,
        "diagnostics_period_s": 0.5,
        "encode_ahead": encode_ahead,
        "engine_process": engine_process,
    }
    cmd = [sys.executable, "-m", "surgery_r1_ros.node.node", "--ros-args"]
    for k, v in params.items():
        cmd += ["-p", f"{k}:={v}"]
    node_proc = start_process(cmd, env, log_dir / f"node-{executor}.log", cwd=ROOT)
    camera_cmd = [sys.executable, str(ROOT / "tests" / "fake_camera.py"), "--topic", topic]
    camera_cmd += ["--width", str(WIDTH), "--height", str(HEIGHT), "--rate", str(RATE)]
    camera_log = log_dir / f"camera-{executor}.log"
    camera = start_process(camera_cmd, env, camera_log, cwd=ROOT)

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(env["ROS_DOMAIN_ID"]))
    node = rclpy.create_node("bench_client", context=context)
    spin = SingleThreadedExecutor(context=context)
    spin.add_node(node)
    thread = threading.Thread(target=lambda: _spin(spin, context), daemon=True)
    thread.start()
    diagnostics: list = []
    node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    client = node.create_client(AskQuestion, "/surgery_r1/ask")
    try:
        if not client.wait_for_service(timeout_sec=120):
            raise RuntimeError(f"node did not come up:\n{(log_dir / f'node-{executor}.log').read_text()}")

        def call() -> tuple[float, object]:
            done = threading.Event()
            start = time.perf_counter()
            future = client.call_async(AskQuestion.Request(question=QUESTION))
            future.add_done_callback(lambda _f: done.set())
            if not done.wait(300):
                raise RuntimeError("no answer in 300 s")
            return (time.perf_counter() - start) * 1000.0, future.result()

        deadline = time.monotonic() + 60
        while not call()[1].image_header.stamp.sec and time.monotonic() < deadline:  # until frames arrive
            time.sleep(0.2)
        for _ in range(WARMUP_QUESTIONS):
            call()
        # the engine alone, here, under the same background: the camera streaming and the (idle) node ingesting
        direct = direct_engine(engine, questions)
        rate = _diagnostic(diagnostics, "input_frame_rate_hz")
        t0 = time.monotonic()
        round_trip, inference, added, in_node, ages, failures = [], [], [], [], [], []
        for _ in range(questions):
            time.sleep(PACE_S * (0.5 + np.random.random()))
            ms, response = call()
            if not response.success and not response.error.startswith("the model gave no readable answer"):
                failures.append(response.error)
                continue
            round_trip.append(ms)
            inference.append(response.inference_ms)
            added.append(ms - response.inference_ms)
            in_node.append(response.latency_ms - response.inference_ms)
            ages.append(response.frame_age_ms)
        elapsed = time.monotonic() - t0
        rate_after = _diagnostic(diagnostics, "input_frame_rate_hz")
        encoded_ahead, encode_ms = _diagnostic(diagnostics, "encoded_ahead"), _diagnostic(diagnostics, "encode_ms")
        stop_process(camera)  # then count every frame it sent against every frame the node took in
        time.sleep(1.0)
        sent, received = _camera_sent(camera_log), int(_diagnostic(diagnostics, "frames_received"))
        return {
            "direct_engine": direct,
            "round_trip": summary(round_trip),
            "service_minus_direct_p50_ms": round(pct(round_trip, 50) - direct["p50_ms"], 2),
            "service_over_direct_p50": round(pct(round_trip, 50) / direct["p50_ms"], 3),
            "engine_in_node": summary(inference),
            "node_adds": summary(added),
            "node_adds_in_node": summary(in_node),
            "node_adds_transport": summary([a - n for a, n in zip(added, in_node, strict=True)]),
            "frame_age_at_request_ms_p50": round(pct(ages, 50), 1),
            "questions_s": round(elapsed, 1),
            "frames_sent": sent,
            "frames_received_by_node": received,
            "input_rate_hz_before_after": [rate, rate_after],
            "frames_encoded_ahead": -1 if np.isnan(encoded_ahead) else int(encoded_ahead),  # -1: not reported
            "encode_ms_last": encode_ms,
            "failures": failures[:5],
        }
    finally:
        context.try_shutdown()
        thread.join(5)
        spin.shutdown(1)
        node.destroy_node()
        stop_process(camera)
        stop_process(node_proc)


def _spin(executor, context) -> None:
    try:
        while context.ok():
            executor.spin_once(timeout_sec=0.05)
    except Exception:
        pass


def _camera_sent(log: Path) -> int:
    """fake_camera.py prints "sent N" every second and "sent N frames in T s" when it stops."""
    counts = [int(x.split()[1]) for x in log.read_text().splitlines() if x.startswith("sent ")] if log.exists() else []
    return counts[-1] if counts else 0


def _diagnostic(diagnostics: list, key: str) -> float:
    """The newest value of ``key`` in the node's /diagnostics."""
    for msg in reversed(diagnostics):
        for kv in msg.status[0].values:
            if kv.key == key:
                return float(kv.value)
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--executors", nargs="+", default=list(EXECUTORS), choices=list(EXECUTORS))
    parser.add_argument("--questions", type=int, default=QUESTIONS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--encode-ahead", choices=("on", "off"), default="on", help="the node's encode_ahead")
    parser.add_argument("--engine-process", nargs="+", choices=("on", "off"), default=["on", "off"],
                        help="the node's engine_process")  # fmt: skip
    args = parser.parse_args()

    results = {
        "setup": {
            "frames": f"{WIDTH}x{HEIGHT} rgb8 at {RATE:g} Hz (fake camera process, sensor-data QoS, SHM transport)",
            "questions": args.questions,
            "encode_ahead": args.encode_ahead,
            "max_new_tokens": MAX_NEW_TOKENS,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
            "python": platform.python_version(),
        },
        "runs": [],
    }
    before = shm_snapshot()
    log_dir = Path(tempfile.mkdtemp(prefix="bench_node_"))
    try:
        with safe_dds() as env:
            env = dict(env)
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
            env["PYTHONUNBUFFERED"] = "1"
            for name in args.engines:
                backend = ENGINES[name]
                engine = make_engine(backend)
                for executor, place in itertools.product(args.executors, args.engine_process):
                    print(f"[{name}] executor {executor}, engine_process {place}: engine alone, then through the "
                          "node ...", flush=True)  # fmt: skip
                    ahead, own = args.encode_ahead == "on", place == "on"
                    run = through_node(backend, engine, executor, args.questions, env, log_dir, ahead, own)
                    results["runs"].append({"engine": name, "executor": executor, "engine_process": place, **run})
                close = getattr(engine, "close", None)
                if callable(close):
                    close()
    finally:
        clean_shm(before)

    print(f"\n{WIDTH}x{HEIGHT} at {RATE:g} Hz, {args.questions} questions each; {results['setup']['machine']}")
    print(
        f"{'engine':9} {'executor':8} {'process':7} {'direct p50/p95':>18} {'service p50/p95':>18} {'ratio':>5}"
        f" {'adds p50':>9}"
        f" {'outside engine p50/p95':>23} {'in node / transport p50':>24} {'frames in':>10}"
        f" {'encoded ahead':>13}"
    )
    for r in results["runs"]:
        d, s, a = r["direct_engine"], r["round_trip"], r["node_adds"]
        print(
            f"{r['engine']:9} {r['executor']:8} {r['engine_process']:7} {d['p50_ms']:7.1f} /{d['p95_ms']:7.1f} ms"
            f" {s['p50_ms']:7.1f} /{s['p95_ms']:7.1f} ms {r['service_over_direct_p50']:5.2f}"
            f" {r['service_minus_direct_p50_ms']:6.1f} ms"
            f" {a['p50_ms']:10.1f} /{a['p95_ms']:7.1f} ms"
            f" {r['node_adds_in_node']['p50_ms']:13.1f} /{r['node_adds_transport']['p50_ms']:6.1f} ms"
            f" {r['frames_received_by_node']:5d}/{r['frames_sent']:<5d} {r['frames_encoded_ahead']:13d}"
        )
    print(
        "ratio = service p50 / direct p50 and adds = service p50 - direct p50 (same background load); outside "
        "engine = round trip - the engine time the node measured, per call"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
