"""The ~/ask_action action in a real ROS 2 graph: a node process, rclpy ActionClients here and in a child process.

The node runs the scripted engine (``tests/fake_engines.py``) whose reasoning is "generated" one word per
token at ``FAKE_ENGINE_TOKEN_S``, so streaming, cancel and the shared queue are tested in seconds: feedback
in order ending in the result's reasoning, cancel mid-way (canceled, node still answers), goals while the
service is in use, a client killed mid-goal, and a goal on an inactive node (rejected).
"""

from __future__ import annotations

import array
import itertools
import threading
import time

import numpy as np
import pytest
from ros_helpers import ros_available, ros_session, wait_for

from surgery_r1_ros.ros_fields import ns_to_stamp, seconds_to_ns

pytestmark = [
    pytest.mark.ros,
    pytest.mark.skipif(not ros_available(), reason="rclpy is not installed"),
    pytest.mark.timeout(300),
]

NODE = "surgery_r1_action"
TOPIC = "/action_rig/left/image_raw"
TOKEN_S = 0.1  # per generated word of the scripted reasoning
MAX_QUEUE = 3
STAMP = 50.0
# What the scripted engine reasons about a 64x48 frame of this colour (11 words, one per token).
COLOUR = (200, 100, 50)
REASONING = "The instrument is in the left-top. size 64x48 mean RGB 200.0,100.0,50.0"


class Goal:
    """One goal sent from this process: its acceptance, feedback and result, filled by rclpy callbacks."""

    def __init__(self, rig, question: str, reasoning: bool, stamp_s: float = 0.0) -> None:
        from surgery_r1_interfaces.action import AskQuestion

        goal = AskQuestion.Goal(question=question, reasoning=reasoning)
        goal.stamp.sec, goal.stamp.nanosec = ns_to_stamp(seconds_to_ns(stamp_s))
        self.feedback: list = []
        self.handle = None
        self.result = None
        self.status = None
        self.answered = threading.Event()  # accepted or rejected
        self.finished = threading.Event()
        future = rig.client.send_goal_async(goal, feedback_callback=lambda msg: self.feedback.append(msg.feedback))
        future.add_done_callback(self._on_response)

    def _on_response(self, future) -> None:
        self.handle = future.result()
        self.answered.set()
        if self.handle.accepted:
            self.handle.get_result_async().add_done_callback(self._on_result)
        else:
            self.finished.set()

    def _on_result(self, future) -> None:
        response = future.result()
        self.status, self.result = response.status, response.result
        self.finished.set()

    def wait(self, timeout: float = 30.0) -> Goal:
        assert self.finished.wait(timeout), "the goal did not finish"
        return self


class Rig:
    def __init__(self, ros) -> None:
        from lifecycle_msgs.srv import ChangeState
        from rclpy.action import ActionClient
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from surgery_r1_interfaces.action import AskQuestion as AskAction
        from surgery_r1_interfaces.srv import AskQuestion

        self.ros = ros
        node = ros.node
        self.camera = node.create_publisher(Image, TOPIC, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.client = ActionClient(node, AskAction, f"/{NODE}/ask_action")
        self.service = node.create_client(AskQuestion, f"/{NODE}/ask")
        self.change = node.create_client(ChangeState, f"/{NODE}/change_state")
        self.AskQuestion = AskQuestion

    def publish(self, stamp_s: float) -> None:
        from sensor_msgs.msg import Image

        msg = Image(height=48, width=64, encoding="rgb8", step=64 * 3)
        msg.header.stamp.sec, msg.header.stamp.nanosec = ns_to_stamp(seconds_to_ns(stamp_s))
        msg.header.frame_id = "camera_left"
        data = array.array("B")
        data.frombytes(np.full((48, 64, 3), COLOUR, np.uint8).tobytes())
        msg.data = data
        self.camera.publish(msg)

    def ask(self, question: str = "Where is suction located?", timeout: float = 30.0):
        response = self.ros.call(self.service, self.AskQuestion.Request(question=question), timeout)
        assert response is not None, "no service response"
        return response

    def goal(self, question: str = "Where is suction located?", reasoning: bool = True, **kw) -> Goal:
        return Goal(self, question, reasoning, **kw)

    def transition(self, transition_id: int) -> bool:
        from lifecycle_msgs.srv import ChangeState

        request = ChangeState.Request()
        request.transition.id = transition_id
        response = self.ros.call(self.change, request, 30)
        return bool(response and response.success)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    with ros_session(tmp_path_factory.mktemp("test_node_action")) as ros:
        ros.env["FAKE_ENGINE_DELAY_S"] = "0.02"
        ros.env["FAKE_ENGINE_TOKEN_S"] = str(TOKEN_S)
        args = {
            "backend": "fake_engines:ScriptedEngine",
            "image_topic": TOPIC,
            "max_frame_age_s": 120.0,  # one frame serves the whole module
            "max_queue": MAX_QUEUE,
            "warmup": False,
        }
        cmd = ["-m", "surgery_r1_ros.node.node", "--ros-args", "-r", f"__node:={NODE}"]
        for name, value in args.items():
            cmd += ["-p", f"{name}:={value}"]
        node = ros.python(cmd, name="node")
        rig = Rig(ros)
        assert rig.client.wait_for_server(timeout_sec=60), f"no ~/ask_action server:\n{node.output()}"
        assert rig.service.wait_for_service(timeout_sec=10)
        assert wait_for(lambda: rig.camera.get_subscription_count() > 0, 30), f"not subscribed:\n{node.output()}"

        def frame_arrived() -> bool:
            # Sent again on every try: the node's camera subscription is best effort (REP-2003 sensor QoS), so a
            # frame published while discovery settles can be lost
            rig.publish(STAMP)
            return rig.ask().success

        assert wait_for(frame_arrived, 10), "the frame did not reach the node"
        rig.process = node
        yield rig
        assert node.alive(), f"the node died:\n{node.output()}"


def test_feedback_streams_in_order_and_ends_in_the_result(rig):
    from action_msgs.msg import GoalStatus

    goal = rig.goal(stamp_s=STAMP).wait()
    assert goal.handle.accepted and goal.status == GoalStatus.STATUS_SUCCEEDED
    result = goal.result
    assert result.success and result.answer == "left-top" and result.reasoning == REASONING
    assert (result.box.width, result.box.height) == (32, 24) and result.coherent
    assert result.image_header.stamp.sec == int(STAMP) and result.image_header.frame_id == "camera_left"
    assert result.latency_ms >= result.inference_ms > 0
    tokens = [f.tokens for f in goal.feedback]
    texts = [f.reasoning for f in goal.feedback]
    assert tokens == list(range(1, len(REASONING.split(" ")) + 1)), tokens  # one feedback per token, in order
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(texts))
    assert texts[0] == "The" and texts[-1] == result.reasoning
    # direct mode: no reasoning to stream, the same answer
    direct = rig.goal(reasoning=False).wait()
    assert direct.status == GoalStatus.STATUS_SUCCEEDED and direct.result.answer == "left-top"
    assert direct.result.reasoning == ""


def test_cancel_midway_ends_canceled_and_the_node_answers_afterwards(rig):
    from action_msgs.msg import GoalStatus

    goal = rig.goal()
    assert wait_for(lambda: len(goal.feedback) >= 3, 10), "no feedback"
    seen_at_cancel = len(goal.feedback)
    cancel = goal.handle.cancel_goal_async()
    assert wait_for(cancel.done, 10) and len(cancel.result().goals_canceling) == 1
    goal.wait()
    assert goal.status == GoalStatus.STATUS_CANCELED
    result = goal.result
    assert not result.success and "cancel" in result.error
    words = result.reasoning.split(" ")
    # stopped within a step or two of the cancel (tokens generated while the cancel travelled), not at the end
    assert 3 <= len(words) <= seen_at_cancel + 3 < len(REASONING.split(" ")), (seen_at_cancel, result.reasoning)
    assert REASONING.startswith(result.reasoning)
    count = len(goal.feedback)
    time.sleep(3 * TOKEN_S)
    assert len(goal.feedback) == count  # generation really stopped
    assert rig.ask().success
    again = rig.goal().wait()
    assert again.status == GoalStatus.STATUS_SUCCEEDED and again.result.reasoning == REASONING


def test_goals_while_the_service_is_in_use(rig):
    """Goals and service requests share one queue: every goal is answered or rejected, every request
    answered or refused as busy, and at least some of each get through."""
    from action_msgs.msg import GoalStatus

    responses: list = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            responses.append(rig.ask())

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        goals = []
        for _ in range(6):
            goals.append(rig.goal())
            time.sleep(0.1)
        for goal in goals:
            goal.wait(60)
    finally:
        stop.set()
        thread.join(30)
    accepted = [g for g in goals if g.handle.accepted]
    assert accepted, "no goal was accepted"
    for goal in accepted:
        assert goal.status == GoalStatus.STATUS_SUCCEEDED, goal.result.error
        assert goal.result.reasoning == REASONING
    assert len(accepted) < len(goals)  # 6 goals of ~0.6 s into a queue of 3: some must be rejected
    assert any(r.success for r in responses)
    for r in responses:
        assert r.success or ("busy" in r.error and "max_queue" in r.error), r.error
    assert wait_for(lambda: "rejected: busy" in rig.process.output(), 5), "the rejection reason was not logged"


def test_a_client_that_disappears_mid_goal_costs_nothing(rig):
    code = f"""
import sys, time, rclpy
from rclpy.action import ActionClient
from surgery_r1_interfaces.action import AskQuestion
rclpy.init()
node = rclpy.create_node("vanishing_client")
client = ActionClient(node, AskQuestion, "/{NODE}/ask_action")
assert client.wait_for_server(timeout_sec=30)
client.send_goal_async(AskQuestion.Goal(question="Where is suction located?", reasoning=True),
                       feedback_callback=lambda m: print("feedback", m.feedback.tokens, flush=True))
while True:
    rclpy.spin_once(node, timeout_sec=0.1)
"""
    client = rig.ros.python(["-c", code], name="vanishing_client")
    try:
        assert client.wait_output("feedback 2", 30), client.output()
    finally:
        client.popen.kill()  # gone without a word: no cancel, no result request
        client.stop()
    # the abandoned goal finishes on its own; the node keeps answering at its usual speed
    start = time.monotonic()
    response = rig.ask()
    assert response.success and time.monotonic() - start < 5
    goal = rig.goal().wait()
    assert goal.result.success and goal.result.reasoning == REASONING
    assert rig.process.alive()


def test_a_goal_on_an_inactive_node_is_rejected(rig):
    from lifecycle_msgs.msg import Transition

    assert rig.transition(Transition.TRANSITION_DEACTIVATE)
    try:
        goal = rig.goal()
        assert goal.answered.wait(10)
        assert not goal.handle.accepted
        assert wait_for(lambda: "rejected: the node is inactive" in rig.process.output(), 5), rig.process.output()
    finally:
        assert rig.transition(Transition.TRANSITION_ACTIVATE)

    def answered_after_a_new_frame() -> bool:  # activation starts with an empty buffer and a new subscription
        rig.publish(STAMP + 1)
        return rig.ask().success

    assert wait_for(answered_after_a_new_frame, 15)
    assert rig.goal().wait().result.success
