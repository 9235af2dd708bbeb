"""The ROS 2 node (the only part of the package, with the bag tools, that imports rclpy).

``node.py`` is the lifecycle node; the other modules are ROS-free and unit-tested without a ROS graph:
``params`` (the parameter table), ``image`` (Image fields <-> numpy), ``buffer`` (stamped frames),
``worker`` (inference thread and bounded queue), ``diagnostics``, ``annotate``, ``engine_loader``.
"""
