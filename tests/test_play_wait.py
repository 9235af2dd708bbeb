"""`bag play`'s wait for subscribers before the first message, on a fake graph (no ROS needed)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from surgery_r1_ros.bag.play import BagPlayer


class FakePublisher:
    """A publisher whose matched-subscription count follows ``matched(elapsed_s)``."""

    def __init__(self, topic_name: str, matched, start: float) -> None:
        self.topic_name = topic_name
        self._matched = matched
        self._start = start

    def get_subscription_count(self) -> int:
        return self._matched(time.monotonic() - self._start)


class FakeNode:
    def __init__(self, known: dict[str, int]) -> None:
        self.known = known

    def count_subscribers(self, topic: str) -> int:
        return self.known.get(topic, 0)


def player_with(known: dict[str, int], matched: dict[str, object]) -> BagPlayer:
    player = BagPlayer(FakeNode(known), Path("unused"))
    start = time.monotonic()
    player.publishers = {t: FakePublisher(t, f, start) for t, f in matched.items()}
    return player


def timed(player: BagPlayer, timeout: float, stop: threading.Event | None = None):
    start = time.monotonic()
    counts = player.wait_for_subscribers(timeout, settle_s=0.05, stop=stop)
    return counts, time.monotonic() - start


def test_waits_for_every_subscriber_the_graph_shows():
    """/left matches at once, /right's known subscriber only after 0.3 s: playback waits for it."""
    player = player_with({"/left": 1, "/right": 1}, {"/left": lambda t: 1, "/right": lambda t: int(t > 0.3)})
    counts, took = timed(player, 5.0)
    assert counts == {"/left": (1, 1), "/right": (1, 1)} and 0.3 < took < 2.0


def test_topics_without_subscribers_do_not_hold_playback():
    player = player_with({"/left": 1}, {"/left": lambda t: 1, "/rosout": lambda t: 0})
    counts, took = timed(player, 5.0)
    assert counts == {"/left": (1, 1), "/rosout": (0, 0)} and took < 1.0


def test_no_subscriber_or_unmatchable_one_waits_until_the_timeout():
    nobody = player_with({}, {"/left": lambda t: 0})
    assert 0.3 <= timed(nobody, 0.3)[1] < 1.5
    incompatible = player_with({"/left": 1, "/right": 1}, {"/left": lambda t: 1, "/right": lambda t: 0})
    counts, took = timed(incompatible, 0.3)
    assert counts["/right"] == (0, 1) and 0.3 <= took < 1.5


def test_stop_ends_the_wait():
    stop = threading.Event()
    stop.set()
    assert timed(player_with({}, {"/left": lambda t: 0}), 5.0, stop)[1] < 0.5
