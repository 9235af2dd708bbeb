"""``bag record``: record live topics to a rosbag2 with raw subscriptions (no decode), via rosbags' writer.

Types come from the ROS graph (wait up to ``discovery_timeout_s`` for every topic to appear). Message
definitions for the bag come from ``rosbags``' typestore, or from the installed ``.msg`` files for types it
does not know (our own ``surgery_r1_interfaces`` answers, for instance). Each message is stamped with its
receive time, as ``ros2 bag record`` does. Ctrl-C, SIGTERM (through ``stop``), ``duration_s`` or
``max_messages`` end the recording, and the bag is always closed so it stays readable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from surgery_r1_ros.bag.ros_types import message_class, register_type

log = logging.getLogger(__name__)


@dataclass
class RecordOptions:
    topics: list[str] = field(default_factory=list)
    all_topics: bool = False
    storage: str = "mcap"
    duration_s: float | None = None
    max_messages: int | None = None
    discovery_timeout_s: float = 5.0
    qos: str = "auto"  # auto | reliable | best_effort

    def check(self) -> None:
        if self.storage not in ("mcap", "sqlite3"):
            raise ValueError(f"unknown storage {self.storage!r}: use mcap or sqlite3")
        if not self.topics and not self.all_topics:
            raise ValueError("no topics to record: give topics or all_topics")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be > 0")
        if self.discovery_timeout_s < 0:
            raise ValueError("--discovery-timeout must be >= 0")
        if self.qos not in ("auto", "reliable", "best_effort"):
            raise ValueError(f"--qos {self.qos!r}: use auto, reliable or best_effort")


@dataclass
class RecordResult:
    bag: Path
    counts: Counter
    types: dict[str, str]
    seconds: float
    stopped_by: str

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"recorded {self.total} messages to {self.bag} in {self.seconds:.2f} s (stopped by {self.stopped_by})"]
        lines += [f"  {t:<40} {self.types[t]:<45} {self.counts.get(t, 0)}" for t in sorted(self.types)]
        return "\n".join(lines)


def discover_types(node, topics: list[str], all_topics: bool, timeout: float) -> dict[str, str]:
    """Topic -> type for the wanted topics, once each has a publisher on the graph (or the timeout passes).

    With ``all_topics`` the whole timeout is spent collecting every topic seen (but /rosout and
    /parameter_events, which every node has), plus the wanted ones.
    """
    deadline = time.monotonic() + timeout
    wanted = [_absolute(t) for t in topics]
    while True:
        graph = {name: types[0] for name, types in node.get_topic_names_and_types() if types}
        found = {t: graph[t] for t in wanted if t in graph}
        if all_topics:
            found.update({n: t for n, t in graph.items() if n not in ("/rosout", "/parameter_events")})
        done = len([t for t in wanted if t in found]) == len(wanted)
        if done and not all_topics:
            return found
        if time.monotonic() >= deadline:
            if done and found:
                return found
            missing = [t for t in wanted if t not in found]
            raise RuntimeError(
                f"no publisher seen within {timeout:g} s for: {', '.join(missing) or 'any topic'} "
                f"(topics on the graph: {', '.join(sorted(graph)) or 'none'}; same ROS_DOMAIN_ID?)"
            )
        time.sleep(0.05)


def _absolute(topic: str) -> str:
    return topic if topic.startswith("/") else "/" + topic


def _subscription_qos(node, topic: str, choice: str):
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    reliability = ReliabilityPolicy.RELIABLE
    if choice == "best_effort":
        reliability = ReliabilityPolicy.BEST_EFFORT
    elif choice == "auto":
        # a reliable subscription does not match a best-effort publisher: follow the publishers
        infos = node.get_publishers_info_by_topic(topic)
        if any(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for i in infos):
            reliability = ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(depth=100, reliability=reliability)


def _recorded_qos(node, topic: str):
    """The offered QoS of the topic's publishers, as rosbags Qos for the bag's metadata."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    profiles = []
    for info in node.get_publishers_info_by_topic(topic):
        q = info.qos_profile
        profiles.append(
            Qos(
                history=QosHistory(int(q.history)) if int(q.history) in (0, 1, 2) else QosHistory.UNKNOWN,
                depth=int(q.depth),
                reliability=QosReliability(int(q.reliability))
                if int(q.reliability) in (0, 1, 2)
                else QosReliability.UNKNOWN,
                durability=QosDurability(int(q.durability))
                if int(q.durability) in (0, 1, 2)
                else QosDurability.UNKNOWN,
                deadline=QosTime(0, 0),
                lifespan=QosTime(0, 0),
                liveliness=QosLiveliness.AUTOMATIC,
                liveliness_lease_duration=QosTime(0, 0),
                avoid_ros_namespace_conventions=False,
            )
        )
    return profiles


def record_bag(
    out: str | Path,
    options: RecordOptions,
    stop: threading.Event | None = None,
    node_name: str = "surgery_r1_bag_recorder",
) -> RecordResult:
    """Record to the bag folder ``out`` (must not exist) until stopped; returns what was written."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from rosbags.rosbag2 import Writer
    from rosbags.rosbag2.enums import StoragePlugin
    from rosbags.typesys import Stores, get_typestore

    options.check()
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists already; remove it or pick another name")
    stop = stop or threading.Event()
    typestore = get_typestore(Stores.ROS2_KILTED)
    counts: Counter = Counter()
    lock = threading.Lock()
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)  # our own handlers stop cleanly
    writer = None
    started = time.monotonic()
    stopped_by = "stop request"
    try:
        node = rclpy.create_node(node_name)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        types = discover_types(node, options.topics, options.all_topics, options.discovery_timeout_s)
        for msgtype in set(types.values()):
            register_type(typestore, msgtype)
        plugin = StoragePlugin.MCAP if options.storage == "mcap" else StoragePlugin.SQLITE3
        writer = Writer(out, version=9, storage_plugin=plugin)
        writer.open()
        conns = {
            topic: writer.add_connection(
                topic, msgtype, typestore=typestore, offered_qos_profiles=_recorded_qos(node, topic)
            )
            for topic, msgtype in types.items()
        }

        def callback_for(topic: str):
            conn = conns[topic]

            def on_message(data: bytes) -> None:
                if stop.is_set():
                    return
                stamp = time.time_ns()
                with lock:
                    writer.write(conn, stamp, data)
                    counts[topic] += 1
                    if options.max_messages is not None and sum(counts.values()) >= options.max_messages:
                        stop.set()

            return on_message

        for topic, msgtype in types.items():
            node.create_subscription(
                message_class(msgtype, topic),
                topic,
                callback_for(topic),
                _subscription_qos(node, topic, options.qos),
                raw=True,
            )
        log.info("recording %s to %s", ", ".join(sorted(types)), out)
        started = time.monotonic()
        deadline = started + options.duration_s if options.duration_s else None
        try:
            while not stop.is_set():
                executor.spin_once(timeout_sec=0.05)
                if deadline is not None and time.monotonic() >= deadline:
                    stopped_by = "duration"
                    break
            else:
                if options.max_messages is not None and sum(counts.values()) >= options.max_messages:
                    stopped_by = "max messages"
        except KeyboardInterrupt:
            stopped_by = "interrupt"
        stop.set()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
    finally:
        if writer is not None:
            with lock:
                writer.close()
        if rclpy.ok():
            rclpy.shutdown()
    return RecordResult(out, counts, types, time.monotonic() - started, stopped_by)
