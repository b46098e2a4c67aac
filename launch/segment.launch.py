"""Launch segment_node for one camera, or one node per camera.

    ros2 launch dgss_perception segment.launch.py model:=/path/to/package camera:=/camera
    ros2 launch dgss_perception segment.launch.py model:=... camera:=/camera/image_raw use_sim_time:=true
    ros2 launch dgss_perception segment.launch.py model:=... cameras:=/front,/rear
    ros2 launch dgss_perception segment.launch.py model:=... camera:=/front managed:=true
    ros2 launch dgss_perception segment.launch.py model:=... camera:=/front painting:=true pointcloud:=/lidar/points
    ros2 launch dgss_perception segment.launch.py model:=... camera:=/front monitor_calibration:=day.json

``camera`` is a namespace (its ``image`` topic is used) or, when it names an image
topic directly (ends in image, image_raw, image_rect, image_color, …), that topic.
``cameras`` (comma-separated) starts one node per camera, named after it; to serve
several cameras from one node (one model in memory) set the node parameter
``cameras`` in the parameter file instead. ``managed:=true`` starts the lifecycle
node, which waits unconfigured for a lifecycle manager (or ``ros2 lifecycle set``).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

from dgss_perception.topics import camera_remaps


def _nodes(context, *args, **kwargs):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    params = [get("params_file"), {"use_sim_time": get("use_sim_time").lower() in ("true", "1")}]
    if get("model"):
        params.append({"model": get("model")})
    if get("monitor_calibration"):
        params.append({"monitor_calibration": get("monitor_calibration")})
    if get("painting").lower() in ("true", "1"):
        params.append({"painting": True, **({"pointcloud_topic": get("pointcloud")} if get("pointcloud") else {})})
    managed = get("managed").lower() in ("true", "1")
    cameras = [c.strip() for c in get("cameras").split(",") if c.strip()] or [get("camera")]
    actions = []
    for cam in cameras:
        name = "segment_node" if len(cameras) == 1 else "segment_node_" + cam.strip("/").replace("/", "_")
        common = dict(package="dgss_perception", name=name, namespace=get("namespace"), parameters=params,
                      remappings=camera_remaps(cam), output="screen", emulate_tty=True)
        actions.append(LifecycleNode(executable="segment_lifecycle_node", **common) if managed
                       else Node(executable="segment_node", **common))
    return actions


def generate_launch_description() -> LaunchDescription:
    default_params = [FindPackageShare("dgss_perception"), "/config/segment.yaml"]
    return LaunchDescription([
        DeclareLaunchArgument("model", default_value="", description="model package directory"),
        DeclareLaunchArgument("camera", default_value="",
                              description="camera namespace (uses <camera>/image) or an image topic"),
        DeclareLaunchArgument("cameras", default_value="",
                              description="comma-separated cameras, one node each (overrides camera)"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="node parameter file"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node(s)"),
        DeclareLaunchArgument("managed", default_value="false",
                              description="start the lifecycle (managed) node instead"),
        DeclareLaunchArgument("monitor_calibration", default_value="",
                              description="domain-shift monitor thresholds (dgss-perception calibrate)"),
        DeclareLaunchArgument("painting", default_value="false",
                              description="publish <camera>/labels/points: the LiDAR cloud with labels"),
        DeclareLaunchArgument("pointcloud", default_value="",
                              description="painting: the LiDAR PointCloud2 topic (default: the parameter file's)"),
        OpaqueFunction(function=_nodes),
    ])
