"""Surgery-R1 on both dVRK endoscope eyes: nodes surgery_r1_left and surgery_r1_right.

    ros2 launch surgery_r1_ros dvrk_stereo.launch.py rig_name:=jhu_daVinci

Each eye has its own node, services (/surgery_r1_left/ask, /surgery_r1_right/ask) and outputs, and
loads its own copy of the model (twice the memory: on one GPU, prefer a small model or one eye).
"""

from launch.actions import DeclareLaunchArgument
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

# The node's default camera topic (dVRK gscam, rig jhu_daVinci, left eye); remapped to /<rig>/<side>/image_raw.
DEFAULT_IMAGE_TOPIC = "/jhu_daVinci/left/image_raw"


def eye(side: str) -> Node:
    image_topic = ["/", LaunchConfiguration("rig_name"), f"/{side}/image_raw"]
    return Node(
        package="surgery_r1_ros",
        executable="surgery_r1_node",
        name=f"surgery_r1_{side}",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "model_path": ParameterValue(LaunchConfiguration("model_path"), value_type=str),
                "backend": ParameterValue(LaunchConfiguration("backend"), value_type=str),
                "device": ParameterValue(LaunchConfiguration("device"), value_type=str),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
            },
        ],
        remappings=[
            (DEFAULT_IMAGE_TOPIC, image_topic),
            (DEFAULT_IMAGE_TOPIC + "/compressed", [*image_topic, "/compressed"]),
        ],
    )


def generate_launch_description() -> LaunchDescription:
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of both nodes and their outputs"),
        DeclareLaunchArgument(
            "rig_name", default_value="jhu_daVinci", description="dVRK rig: images from /<rig>/{left,right}/image_raw"
        ),
        DeclareLaunchArgument(
            "model_path", default_value="", description="Model folder; empty: the built-in model in the package"
        ),
        DeclareLaunchArgument(
            "backend", default_value="auto", description="auto, torch, onnxruntime, tensorrt or package.module:Class"
        ),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("surgery_r1_ros"), "config", "surgery_r1.yaml"]),
            description="Node parameters for both eyes (YAML with /**: ros__parameters:)",
        ),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false", description="Use /clock (true when replaying a bag with --clock)"
        ),
    ]
    return LaunchDescription([*arguments, eye("left"), eye("right")])
