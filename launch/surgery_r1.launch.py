"""Surgery-R1 on one dVRK endoscope camera.

    ros2 launch surgery_r1_ros surgery_r1.launch.py rig_name:=jhu_daVinci camera_side:=left
    ros2 launch surgery_r1_ros surgery_r1.launch.py model_path:=/models/surgery_r1_3b device:=cuda
    ros2 launch surgery_r1_ros surgery_r1.launch.py use_sim_time:=true   # with `ros2 bag play --clock`

Ask with:  ros2 service call /surgery_r1/ask surgery_r1_interfaces/srv/AskQuestion
           "{question: 'Where is bipolar_forceps located?', reasoning: false}"
"""

from launch.actions import DeclareLaunchArgument
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

# The node's default camera topic (dVRK gscam, rig jhu_daVinci, left eye); remapped to /<rig>/<side>/image_raw.
DEFAULT_IMAGE_TOPIC = "/jhu_daVinci/left/image_raw"


def generate_launch_description() -> LaunchDescription:
    rig = LaunchConfiguration("rig_name")
    side = LaunchConfiguration("camera_side")
    image_topic = ["/", rig, "/", side, "/image_raw"]
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its outputs"),
        DeclareLaunchArgument(
            "rig_name", default_value="jhu_daVinci", description="dVRK rig: images from /<rig>/<side>/image_raw"
        ),
        DeclareLaunchArgument(
            "camera_side", default_value="left", choices=["left", "right"], description="Endoscope eye to answer about"
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
            description="Node parameters (YAML with /**: ros__parameters:)",
        ),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false", description="Use /clock (true when replaying a bag with --clock)"
        ),
    ]
    node = Node(
        package="surgery_r1_ros",
        executable="surgery_r1_node",
        name="surgery_r1",
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
    return LaunchDescription([*arguments, node])
