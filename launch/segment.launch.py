"""Launch segment_node for one camera.

    ros2 launch dgss_perception segment.launch.py model:=/path/to/package camera:=/camera
    ros2 launch dgss_perception segment.launch.py model:=... camera:=/camera/image_raw use_sim_time:=true

``camera`` is a namespace (its ``image`` topic is used) or, when it names an image
topic directly (ends in image, image_raw, image_rect, image_color, …), that topic.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from dgss_perception.topics import camera_remaps


def _node(context, *args, **kwargs):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    params = [get("params_file"), {"use_sim_time": get("use_sim_time").lower() in ("true", "1")}]
    if get("model"):
        params.append({"model": get("model")})
    return [Node(package="dgss_perception", executable="segment_node", name="segment_node",
                 namespace=get("namespace"), parameters=params, remappings=camera_remaps(get("camera")),
                 output="screen", emulate_tty=True)]


def generate_launch_description() -> LaunchDescription:
    default_params = [FindPackageShare("dgss_perception"), "/config/segment.yaml"]
    return LaunchDescription([
        DeclareLaunchArgument("model", default_value="", description="model package directory"),
        DeclareLaunchArgument("camera", default_value="",
                              description="camera namespace (uses <camera>/image) or an image topic"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="node parameter file"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        OpaqueFunction(function=_node),
    ])
