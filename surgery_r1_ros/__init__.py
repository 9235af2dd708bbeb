"""Surgery-R1 for ROS 2: grounded, reasoned answers about what the dVRK endoscope sees."""

__version__ = "0.1.0"
