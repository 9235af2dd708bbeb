"""rosbag2 I/O without ROS's own bag stack: synthesize, read, play and record bags.

Only ``play`` and ``record`` import rclpy, lazily; ``synth``, ``reader`` and ``cdr`` work without ROS
installed. Evaluating the node on a bag (``bag eval``) is ``surgery_r1_ros.bag_eval``.
"""
