"""``surgery-r1 bag ...``: synth, info, play, record and eval rosbag2 bags (mcap and sqlite3)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from surgery_r1_ros.bag.synth import DEFAULT_SIZE, DVRK_SIZE, NAMESPACE
from surgery_r1_ros.boxes import parse_size

_SIZE_HELP = (
    f"frame size WxH (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}; the real dVRK HD endoscope is "
    f"{DVRK_SIZE[0]}x{DVRK_SIZE[1]}, ~7.9 MB per stereo pair at 30 Hz)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    bag = subparsers.add_parser("bag", help="rosbag2 tools: synth, info, play, record, eval (mcap and sqlite3)")
    sub = bag.add_subparsers(dest="bag_command", required=True, metavar="ACTION")

    synth = sub.add_parser(
        "synth",
        help="write a rosbag2 of a synthetic stereo endoscope sequence plus its ground-truth questions",
        description="Writes OUT/ (rosbag2: left/right image_raw + camera_info at 30 Hz under the namespace) and "
        "OUT.questions.jsonl (questions, answers and boxes at a subset of stamps). Needs no ROS install.",
    )
    synth.add_argument("out", type=Path, help="bag folder to create (must not exist)")
    synth.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"))
    synth.add_argument("--seconds", type=float, default=4.0, help="length of the sequence (default 4)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", default=f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}", help=_SIZE_HELP)
    synth.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30, exact stamps)")
    synth.add_argument(
        "--question-every",
        type=float,
        default=0.5,
        metavar="S",
        help="write the ground-truth questions of every frame S seconds apart (default 0.5)",
    )
    synth.add_argument("--difficulty", default="normal", choices=("easy", "normal", "hard"))
    synth.add_argument("--namespace", default=NAMESPACE, help=f"camera namespace (default {NAMESPACE})")
    synth.add_argument("--mono", action="store_true", help="left eye only")
    synth.add_argument("--compress", action="store_true", help="zstd (mcap chunks / sqlite3 per message)")
    synth.set_defaults(handler=_synth)

    info = sub.add_parser("info", help="topics, types, counts and time range of a bag")
    info.add_argument("bag", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_info)

    from surgery_r1_ros.bag.play import PlayOptions

    play = sub.add_parser(
        "play",
        help="play a rosbag2 with its timing (stand-in for `ros2 bag play`)",
        description="Publishes the bag's raw CDR messages with rclpy at their recorded times divided by --rate. "
        "QoS --qos auto: the recorded profile when the bag has one, else reliable/volatile depth 10 (matches "
        "reliable and best-effort subscribers); reliable / best_effort / sensor_data force one profile.",
    )
    play.add_argument("bag", type=Path, help="rosbag2 folder, or one .mcap/.db3 file")
    _add_play_args(play)
    play.add_argument("--loop", action="store_true", help="play again from the start until interrupted")
    play.add_argument(
        "--clock",
        nargs="?",
        type=float,
        const=40.0,
        default=None,
        metavar="HZ",
        help="publish rosgraph_msgs/Clock on /clock at HZ (default 40) in bag time",
    )
    play.add_argument(
        "--wait-for-subscribers",
        type=float,
        default=PlayOptions.wait_for_subscribers_s,
        metavar="S",
        help="before the first message, wait up to S seconds (default %(default)g) until each topic's publisher "
        "has matched the subscribers that already run and at least one topic has one, so they miss nothing; "
        "with no subscriber at all, play after S seconds; 0: play at once (subscribers may miss the first messages)",
    )
    play.add_argument("--delay", type=float, default=0.0, metavar="S", help="sleep S seconds before playing")
    play.add_argument("--json", action="store_true", help="print the playback statistics as JSON")
    play.set_defaults(handler=_play)

    record = sub.add_parser(
        "record",
        help="record live topics to a rosbag2 (raw CDR, types discovered from the graph)",
        description="Subscribes raw to the topics (types found on the ROS graph within --discovery-timeout) and "
        "writes each message with its receive time. Stops on Ctrl-C / SIGTERM or after --duration; the bag is "
        "closed properly either way.",
    )
    record.add_argument("out", type=Path, help="bag folder to create (must not exist)")
    record.add_argument("--topics", nargs="+", default=None, help="topics to record")
    record.add_argument("--all", action="store_true", help="record every topic seen during discovery")
    record.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"))
    record.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    record.add_argument("--max-messages", type=int, default=None, help="stop after this many messages")
    record.add_argument(
        "--discovery-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="how long to wait for the topics to appear (default 5)",
    )
    record.add_argument(
        "--qos",
        default="auto",
        choices=("auto", "reliable", "best_effort"),
        help="subscription reliability; auto: best effort if any publisher is (default)",
    )
    record.set_defaults(handler=_record)

    ev = sub.add_parser(
        "eval",
        help="replay a bag into the node, ask the ground-truth questions at their stamps, write a report",
        description="Plays BAG into the Surgery-R1 node and calls ~/ask for each question at its stamp "
        "(--pace pause holds playback at a question frame until its questions are answered; realtime keeps "
        "playing). Writes report.json, report.md and answers.png (truth green, prediction red) to --out.",
    )
    ev.add_argument("bag", type=Path)
    ev.add_argument(
        "--questions",
        type=Path,
        default=None,
        help="questions JSONL (default: BAG.questions.jsonl written by `bag synth`)",
    )
    ev.add_argument("--out", type=Path, required=True, help="report folder")
    ev.add_argument(
        "--node",
        default="start",
        choices=("start", "running"),
        help="start: launch surgery_r1_node for the run (safe local DDS); running: use one already up",
    )
    ev.add_argument(
        "--node-name",
        default="/surgery_r1",
        help="fully qualified node name whose ~/ask is called (default /surgery_r1)",
    )
    ev.add_argument("--model", default=None, help="with --node start: model folder (default: the built-in model)")
    ev.add_argument(
        "--node-param",
        nargs="+",
        default=[],
        metavar="NAME:=VALUE",
        help="with --node start: extra node parameters, e.g. backend:=onnxruntime device:=cpu",
    )
    ev.add_argument(
        "--image-topic",
        default=None,
        help="bag topic the node reads (default: the node's image_topic, /jhu_daVinci/left/image_raw)",
    )
    ev.add_argument("--pace", default="pause", choices=("pause", "realtime"))
    ev.add_argument("--reasoning", default="on", choices=("on", "off"), help="ask for reasoning (default on)")
    ev.add_argument("--max-questions", type=int, default=None, help="ask at most this many (spread evenly)")
    ev.add_argument("--rate", type=float, default=1.0)
    ev.add_argument("--qos", default="auto", choices=("auto", "reliable", "best_effort", "sensor_data"))
    ev.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per-question service timeout")
    ev.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="how long to wait for the node's ~/ask service",
    )
    ev.add_argument("--sheet", type=int, default=12, help="answers on the PNG sheet (default 12)")
    ev.set_defaults(handler=_eval)


def _add_play_args(parser: argparse.ArgumentParser) -> None:
    from surgery_r1_ros.bag.play import QOS_CHOICES

    parser.add_argument("--rate", type=float, default=1.0, help="speed factor (default 1.0 = recorded timing)")
    parser.add_argument("--topics", nargs="+", default=None, help="play only these topics")
    parser.add_argument("--qos", default="auto", choices=QOS_CHOICES, help="publisher QoS (default auto)")
    parser.add_argument("--remap", nargs="+", default=[], metavar="FROM:=TO", help="publish a topic under another name")
    parser.add_argument("--start-offset", type=float, default=0.0, metavar="S", help="skip the first S seconds")
    parser.add_argument(
        "--skip-missing-types",
        action="store_true",
        help="skip (with a warning) topics whose message package is not installed, instead of failing",
    )


def parse_remap(items: list[str], flag: str = "--remap", form: str = "FROM:=TO") -> dict[str, str]:
    remap = {}
    for item in items:
        if ":=" not in item:
            raise ValueError(f"{flag} {item!r}: expected {form}")
        a, b = item.split(":=", 1)
        remap[a] = b
    return remap


def _synth(args: argparse.Namespace) -> int:
    from surgery_r1_ros.bag.synth import BagSynthOptions, synth_bag

    options = BagSynthOptions(
        seconds=args.seconds,
        seed=args.seed,
        size=parse_size(args.size),
        storage=args.storage,
        fps=args.fps,
        question_every_s=args.question_every,
        difficulty=args.difficulty,
        namespace=args.namespace.rstrip("/") or NAMESPACE,
        compress=args.compress,
        stereo=not args.mono,
    )
    print(synth_bag(args.out, options).summary())
    return 0


def _info(args: argparse.Namespace) -> int:
    from surgery_r1_ros.bag.reader import bag_info

    info = bag_info(args.bag)
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(info.path),
                    "storage": info.storage,
                    "version": info.version,
                    "files": [str(f) for f in info.files],
                    "message_count": info.message_count,
                    "start_ns": info.start_ns,
                    "end_ns": info.end_ns,
                    "duration_s": info.duration_s,
                    "topics": [{"name": t.name, "type": t.msgtype, "count": t.count} for t in info.topics],
                },
                indent=2,
            )
        )
    else:
        print(info.summary())
    return 0


def _play(args: argparse.Namespace) -> int:
    from surgery_r1_ros.bag.play import PlayOptions, play_bag

    options = PlayOptions(
        rate=args.rate,
        loop=args.loop,
        topics=args.topics,
        clock=args.clock is not None,
        clock_hz=args.clock or 40.0,
        qos=args.qos,
        skip_missing_types=args.skip_missing_types,
        remap=parse_remap(args.remap),
        start_offset_s=args.start_offset,
        wait_for_subscribers_s=args.wait_for_subscribers,
        delay_s=args.delay,
    )
    options.check()
    stop = threading.Event()
    _stop_on_sigterm(stop)
    stats = play_bag(args.bag, options, stop)
    print(json.dumps(stats.as_dict(), indent=2) if args.json else stats.summary())
    return 0


def _record(args: argparse.Namespace) -> int:
    from surgery_r1_ros.bag.record import RecordOptions, record_bag

    if not args.topics and not args.all:
        raise ValueError("give --topics T [T ...] or --all")
    options = RecordOptions(
        topics=args.topics or [],
        all_topics=args.all,
        storage=args.storage,
        duration_s=args.duration,
        max_messages=args.max_messages,
        discovery_timeout_s=args.discovery_timeout,
        qos=args.qos,
    )
    stop = threading.Event()
    _stop_on_sigterm(stop)
    print(record_bag(args.out, options, stop).summary())
    return 0


def _eval(args: argparse.Namespace) -> int:
    from surgery_r1_ros.bag_eval import EvalOptions, run_eval

    options = EvalOptions(
        questions=args.questions,
        node=args.node,
        node_name=args.node_name,
        model=args.model,
        image_topic=args.image_topic,
        pace=args.pace,
        reasoning=args.reasoning == "on",
        max_questions=args.max_questions,
        rate=args.rate,
        qos=args.qos,
        timeout_s=args.timeout,
        startup_timeout_s=args.startup_timeout,
        sheet=args.sheet,
        node_params=parse_remap(args.node_param, "--node-param", "NAME:=VALUE"),
    )
    result = run_eval(args.bag, args.out, options)
    print(result.summary())
    return 0


def _stop_on_sigterm(stop: threading.Event) -> None:
    """SIGINT (Ctrl-C) and SIGTERM set ``stop``: the tools finish cleanly (bag closed, node shut down)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
