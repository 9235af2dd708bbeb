"""rosbag2 tools without ROS's own bag stack: synthesize, read, play, record and evaluate bags.

Only ``play``, ``record`` and ``evaluate`` import rclpy, lazily; ``synth`` and ``reader`` work
without ROS installed.
"""
