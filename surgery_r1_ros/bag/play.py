"""``bag play``: publish a rosbag2's messages with their original timing, the stand-in for ``ros2 bag play``.

Messages go out as the raw CDR bytes stored in the bag (no decode, no copy into message objects),
through rclpy publishers of the recorded type, at ``bag time / rate`` after the start.

QoS: rosbag2 records the publishers' offered QoS, but many bags (all written by ``rosbags``) carry
none, so the player chooses per topic. ``--qos auto`` (default) uses the recorded reliability and
durability when the bag has them, else reliable/volatile with depth 10: a reliable publisher matches
both reliable and best-effort subscribers. ``reliable``, ``best_effort`` and ``sensor_data`` force one
profile for every topic (``sensor_data`` = best effort, keep last 5, as camera drivers publish).

Discovery: a publisher reaches a subscriber only once the two have matched, which takes from under 0.1 s
to ~2 s after the player starts. Before the first message the player waits (``wait_for_subscribers_s``,
default 5 s) until every publisher has matched all the subscriptions the ROS graph shows on its topic and
at least one topic has a subscriber, so subscribers that already run get the bag from its first message.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from surgery_r1_ros.bag.reader import BagInfo, BagMessage, BagReader
from surgery_r1_ros.bag.ros_types import MissingTypeError, message_class
from surgery_r1_ros.ros_fields import ns_to_seconds, ns_to_stamp, seconds_to_ns

log = logging.getLogger(__name__)

QOS_CHOICES = ("auto", "reliable", "best_effort", "sensor_data")


@dataclass
class PlayOptions:
    """How to play a bag."""

    rate: float = 1.0
    loop: bool = False
    topics: list[str] | None = None  # None: all topics
    clock: bool = False
    clock_hz: float = 40.0
    qos: str = "auto"
    skip_missing_types: bool = False
    remap: dict[str, str] = field(default_factory=dict)
    start_offset_s: float = 0.0
    wait_for_subscribers_s: float = 5.0  # before playing, wait up to this long for the subscribers (0: none)
    delay_s: float = 0.0  # sleep this long before playing (after the wait for subscribers)
    max_loops: int | None = None  # with loop: stop after this many passes (None: until stopped)

    def check(self) -> None:
        if not 0 < self.rate <= 1000:
            raise ValueError(f"--rate {self.rate}: must be > 0 (1.0 = recorded speed)")
        if self.qos not in QOS_CHOICES:
            raise ValueError(f"--qos {self.qos!r}: choose one of {', '.join(QOS_CHOICES)}")
        if self.clock_hz <= 0:
            raise ValueError("--clock rate must be > 0 Hz")
        if self.start_offset_s < 0:
            raise ValueError("--start-offset must be >= 0")
        if self.delay_s < 0:
            raise ValueError("--delay must be >= 0")
        if self.wait_for_subscribers_s < 0:
            raise ValueError("--wait-for-subscribers must be >= 0")


@dataclass
class PlayStats:
    """What the player did and how closely it kept the bag's timing."""

    bag: str
    published: Counter = field(default_factory=Counter)
    skipped_topics: dict[str, str] = field(default_factory=dict)  # topic -> why
    loops: int = 0
    wall_s: float = 0.0
    paused_s: float = 0.0
    clock_messages: int = 0
    lateness_ms: list[float] = field(default_factory=list)  # publish time minus scheduled time
    stopped_early: bool = False

    @property
    def total(self) -> int:
        return sum(self.published.values())

    def timing(self) -> dict[str, float]:
        """Lateness of publishing against the schedule, in ms (p50, p95, max)."""
        if not self.lateness_ms:
            return {"p50_ms": 0.0, "p95_ms": 0.0, "max_ms": 0.0}
        values = sorted(self.lateness_ms)
        return {
            "p50_ms": statistics.median(values),
            "p95_ms": values[min(len(values) - 1, round(0.95 * (len(values) - 1)))],
            "max_ms": values[-1],
        }

    def summary(self) -> str:
        t = self.timing()
        lines = [
            f"played {self.total} messages from {self.bag} in {self.wall_s:.2f} s"
            + (f" ({self.loops} loops)" if self.loops > 1 else "")
            + (" (stopped early)" if self.stopped_early else ""),
            f"  timing vs schedule: p50 {t['p50_ms']:.2f} ms, p95 {t['p95_ms']:.2f} ms, max {t['max_ms']:.2f} ms",
        ]
        lines += [f"  {topic:<40} {n}" for topic, n in sorted(self.published.items())]
        lines += [f"  skipped {topic}: {why}" for topic, why in sorted(self.skipped_topics.items())]
        if self.clock_messages:
            lines.append(f"  /clock: {self.clock_messages} messages")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "bag": self.bag,
            "published": dict(self.published),
            "total": self.total,
            "skipped_topics": self.skipped_topics,
            "loops": self.loops,
            "wall_s": round(self.wall_s, 4),
            "paused_s": round(self.paused_s, 4),
            "clock_messages": self.clock_messages,
            "timing": {k: round(v, 4) for k, v in self.timing().items()},
            "stopped_early": self.stopped_early,
        }


def qos_for(choice: str, recorded: Iterable = ()):
    """The rclpy QoS profile for a topic under the ``--qos`` choice (see the module docstring)."""
    from rclpy.qos import (
        DurabilityPolicy,
        HistoryPolicy,
        QoSProfile,
        ReliabilityPolicy,
        qos_profile_sensor_data,
    )

    if choice == "sensor_data":
        return qos_profile_sensor_data
    if choice in ("reliable", "best_effort"):
        reliability = ReliabilityPolicy.RELIABLE if choice == "reliable" else ReliabilityPolicy.BEST_EFFORT
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=reliability)
    recorded = list(recorded)
    reliability, durability, depth = ReliabilityPolicy.RELIABLE, DurabilityPolicy.VOLATILE, 10
    if recorded:
        # several publishers may have been recorded: best effort if any was, transient local only if all were
        names = [getattr(q.reliability, "name", str(q.reliability)) for q in recorded]
        if "BEST_EFFORT" in names:
            reliability = ReliabilityPolicy.BEST_EFFORT
        durabilities = [getattr(q.durability, "name", str(q.durability)) for q in recorded]
        if durabilities and all(d == "TRANSIENT_LOCAL" for d in durabilities):
            durability = DurabilityPolicy.TRANSIENT_LOCAL
        depths = [int(q.depth) for q in recorded if int(getattr(q, "depth", 0) or 0) > 0]
        depth = max(depths) if depths else 10
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability, durability=durability)


class BagPlayer:
    """Plays one bag through publishers on ``node``. Open with :meth:`prepare`, then :meth:`play`."""

    def __init__(self, node, bag: str | Path, options: PlayOptions | None = None) -> None:
        self.node = node
        self.path = Path(bag)
        self.options = options or PlayOptions()
        self.options.check()
        self.info: BagInfo | None = None
        self.publishers: dict[str, object] = {}
        self.clock_pub = None
        self.stats = PlayStats(bag=str(self.path))
        self._pause_lock = threading.Lock()

    # -- setup -----------------------------------------------------------------------------------
    def prepare(self) -> BagInfo:
        """Read the bag's metadata and create a publisher per played topic (type errors happen here)."""
        with BagReader(self.path) as bag:
            info = bag.info
        assert info is not None
        self.info = info
        names = {t.name for t in info.topics}
        if self.options.topics:
            unknown = [t for t in self.options.topics if t not in names]
            if unknown:
                raise ValueError(
                    f"{self.path}: no topic(s) {', '.join(unknown)}; topics: {', '.join(sorted(names)) or 'none'}"
                )
        selected = [t for t in info.topics if not self.options.topics or t.name in self.options.topics]
        problems = []
        for topic in selected:
            try:
                cls = message_class(topic.msgtype, topic.name)
            except MissingTypeError as err:
                if not self.options.skip_missing_types:
                    problems.append(str(err))
                else:
                    log.warning("skipping %s", err)
                    self.stats.skipped_topics[topic.name] = str(err)
                continue
            out_name = self.options.remap.get(topic.name, topic.name)
            self.publishers[topic.name] = self.node.create_publisher(
                cls, out_name, qos_for(self.options.qos, topic.qos)
            )
        if problems:
            raise MissingTypeError(
                f"{self.path}: cannot play {len(problems)} topic(s) (use --skip-missing-types to play the rest):\n  "
                + "\n  ".join(problems)
            )
        if self.options.clock:
            from rclpy.qos import QoSProfile
            from rosgraph_msgs.msg import Clock

            self.clock_pub = self.node.create_publisher(Clock, "/clock", QoSProfile(depth=1))
        return info

    def subscriber_counts(self) -> dict[str, tuple[int, int]]:
        """Per played topic: (subscriptions its publisher has matched, subscriptions the ROS graph shows)."""
        return {
            topic: (pub.get_subscription_count(), self.node.count_subscribers(pub.topic_name))
            for topic, pub in self.publishers.items()
        }

    def wait_for_subscribers(
        self, timeout: float, settle_s: float = 0.25, stop: threading.Event | None = None
    ) -> dict[str, tuple[int, int]]:
        """Wait until the subscribers that exist are matched; returns :meth:`subscriber_counts` at the end.

        Done when at least one topic has a subscriber and every publisher has matched all the subscriptions
        the graph shows on its topic, without change for ``settle_s`` (subscriptions of a process discovered
        a moment later, and the subscriber's side of matching, which may lag the publisher's), or after
        ``timeout`` seconds, or when ``stop`` is set. Topics nobody subscribes to do not hold playback back.
        """
        stop = stop or threading.Event()
        deadline = time.monotonic() + timeout
        settled_since = None
        while True:
            counts = self.subscriber_counts()
            now = time.monotonic()
            ready = any(m for m, _ in counts.values()) and all(m >= known for m, known in counts.values())
            if not ready:
                settled_since = None
            elif settled_since is None:
                settled_since = now
            if (settled_since is not None and now - settled_since >= settle_s) or now >= deadline or stop.is_set():
                return counts
            stop.wait(0.02)

    def _wait_before_playing(self, timeout: float, stop: threading.Event) -> None:
        started = time.monotonic()
        counts = self.wait_for_subscribers(timeout, stop=stop)
        if stop.is_set():
            return
        if not any(m for m, _ in counts.values()):
            log.warning("no subscriber after %.1f s: playing anyway", timeout)
            return
        for topic, (matched, known) in sorted(counts.items()):
            if matched < known:
                log.warning("%s: matched %d of its %d subscriptions after %.1f s (incompatible QoS?)",
                            topic, matched, known, timeout)  # fmt: skip
        topics = ", ".join(f"{t} ({m})" for t, (m, _) in sorted(counts.items()) if m)
        log.info("subscribers matched after %.2f s: %s", time.monotonic() - started, topics)

    # -- playing ---------------------------------------------------------------------------------
    def play(
        self,
        stop: threading.Event | None = None,
        on_message: Callable[[BagMessage], None] | None = None,
    ) -> PlayStats:
        """Publish the bag (looping if asked) until done or ``stop`` is set.

        ``on_message`` runs after each publish; time spent in it pauses the bag clock, so a caller can
        hold playback at a message (e.g. to ask questions about a frame) without breaking the timing.
        """
        if self.info is None:
            self.prepare()
        assert self.info is not None
        stop = stop or threading.Event()
        opts = self.options
        if opts.wait_for_subscribers_s > 0 and self.publishers:
            self._wait_before_playing(opts.wait_for_subscribers_s, stop)
        if opts.delay_s > 0:
            stop.wait(opts.delay_s)
        played = list(self.publishers)
        if not played or self.info.message_count == 0:
            log.warning("%s: nothing to play (%d messages)", self.path, self.info.message_count)
            return self.stats
        start_ns = self.info.start_ns + seconds_to_ns(opts.start_offset_s)
        wall0 = time.perf_counter()
        passes = 0
        while not stop.is_set():
            passes += 1
            self._play_once(played, start_ns, stop, on_message)
            self.stats.loops = passes
            if not opts.loop or (opts.max_loops is not None and passes >= opts.max_loops):
                break
        self.stats.stopped_early = stop.is_set()
        self.stats.wall_s = time.perf_counter() - wall0
        return self.stats

    def _play_once(self, topics, start_ns, stop, on_message) -> None:
        rate = self.options.rate
        clock_period = 1.0 / self.options.clock_hz
        next_clock = 0.0
        origin = None  # wall time that corresponds to start_ns
        with BagReader(self.path) as bag:
            for msg in bag.messages(topics, start_ns=start_ns):
                if origin is None:
                    origin = time.perf_counter()
                    if self.clock_pub is not None:
                        self._publish_clock(start_ns)
                        next_clock = origin + clock_period
                target = origin + ns_to_seconds(msg.timestamp - start_ns) / rate
                # sleep in slices so a stop request or a /clock tick is never late by more than a slice
                while True:
                    now = time.perf_counter()
                    if stop.is_set():
                        return
                    if self.clock_pub is not None and now >= next_clock:
                        self._publish_clock(start_ns + seconds_to_ns((now - origin) * rate))
                        next_clock += clock_period * max(1, int((now - next_clock) / clock_period) + 1)
                    remaining = target - now
                    if remaining <= 0:
                        break
                    wake = min(target, next_clock) if self.clock_pub is not None else target
                    slice_s = min(wake - now, 0.05)
                    if slice_s > 0.0015:
                        time.sleep(slice_s - 0.001)
                    # else: spin the last millisecond for sub-ms accuracy
                self.publishers[msg.topic].publish(msg.data)
                published = time.perf_counter()
                self.stats.lateness_ms.append((published - target) * 1e3)
                self.stats.published[msg.topic] += 1
                if on_message is not None:
                    on_message(msg)
                    held = time.perf_counter() - published
                    if held > 0:
                        origin += held  # the bag clock stood still while the caller held it
                        next_clock += held
                        self.stats.paused_s += held

    def _publish_clock(self, ns: int) -> None:
        from rosgraph_msgs.msg import Clock

        clock = Clock()
        clock.clock.sec, clock.clock.nanosec = ns_to_stamp(ns)
        self.clock_pub.publish(clock)
        self.stats.clock_messages += 1


def play_bag(
    bag: str | Path, options: PlayOptions, stop: threading.Event | None = None, node_name: str = "surgery_r1_bag_player"
) -> PlayStats:
    """``bag play`` in this process: init rclpy, play, shut down. SIGINT stops playback cleanly."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    stop = stop or threading.Event()
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)  # our own handlers stop cleanly
    try:
        node = rclpy.create_node(node_name)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spinner = threading.Thread(target=_spin, args=(executor, stop), daemon=True)
        spinner.start()
        player = BagPlayer(node, bag, options)
        try:
            player.prepare()
            return player.play(stop)
        except KeyboardInterrupt:
            stop.set()
            player.stats.stopped_early = True
            return player.stats
        finally:
            stop.set()
            spinner.join(2.0)
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
    finally:
        if rclpy.ok():
            rclpy.shutdown()


def _spin(executor, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            executor.spin_once(timeout_sec=0.05)
        except Exception as err:  # context shut down under us
            log.debug("spin stopped: %s", err)
            return
