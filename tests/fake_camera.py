"""A stand-in camera for node tests and benchmarks: publish rgb8 frames at a fixed rate until stopped.

    python tests/fake_camera.py --topic /cam/image_raw --width 1280 --height 1024 --rate 30

Prints "publishing" once a subscriber has matched, then one line per second with the frames sent.
The frame's content changes every frame (a moving bright square) and its stamp is the publish time.
"""

from __future__ import annotations

import argparse
import array
import signal
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--frame-id", default="/camera_left")  # gscam style, with a leading '/'
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: never)")
    args = parser.parse_args()

    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("fake_camera")
    pub = node.create_publisher(Image, args.topic, qos_profile_sensor_data)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    base = np.full((args.height, args.width, 3), (180, 90, 80), np.uint8)  # tissue pink
    frames = []
    for i in range(8):  # a few pre-built frames, cycled: building 4 MB per frame would cost more than sending it
        img = base.copy()
        x = (i * args.width // 8) % (args.width - 64)
        img[100:164, x : x + 64] = 255
        data = array.array("B")
        data.frombytes(img)
        frames.append(data)
    msg = Image(height=args.height, width=args.width, encoding="rgb8", step=args.width * 3)
    msg.header.frame_id = args.frame_id

    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline and not stop:
        time.sleep(0.02)
    print("publishing", flush=True)
    period = 1.0 / args.rate
    start = next_t = time.monotonic()
    sent, last_report = 0, start
    try:
        while not stop and (args.duration <= 0 or time.monotonic() - start < args.duration):
            msg.data = frames[sent % len(frames)]
            msg.header.stamp = node.get_clock().now().to_msg()
            pub.publish(msg)
            sent += 1
            next_t += period
            now = time.monotonic()
            if now - last_report >= 1.0:
                print(f"sent {sent}", flush=True)
                last_report = now
            time.sleep(max(0.0, next_t - now))
    except KeyboardInterrupt:
        pass
    finally:
        print(f"sent {sent} frames in {time.monotonic() - start:.1f} s", flush=True)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
