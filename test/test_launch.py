"""Launch file and parameter file."""

from __future__ import annotations

import ast
import importlib.util
import time
from pathlib import Path

import pytest
import yaml

from dgss_perception.node import PARAMETERS
from dgss_perception.topics import camera_remaps

from rosutil import start_node_process, stop_process

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "segment.launch.py"
ARGUMENTS = {"model", "camera", "cameras", "params_file", "use_sim_time", "namespace", "managed", "painting",
             "pointcloud", "monitor_calibration"}


def test_launch_declares_the_documented_arguments():
    tree = ast.parse(LAUNCH.read_text())
    declared = {call.args[0].value for call in ast.walk(tree)
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "DeclareLaunchArgument"}
    assert declared == ARGUMENTS


@pytest.mark.skipif(importlib.util.find_spec("launch") is None or importlib.util.find_spec("launch_ros") is None,
                    reason="launch and launch_ros come with a ROS 2 install")
def test_launch_file_loads():
    from launch.actions import DeclareLaunchArgument
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    description = PythonLaunchDescriptionSource(str(LAUNCH)).get_launch_description(None)
    names = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert names == ARGUMENTS


def test_camera_remaps():
    assert camera_remaps("") == []
    ns = dict(camera_remaps("/front"))
    assert ns["image"] == "/front/image" and ns["image/compressed"] == "/front/image/compressed"
    assert ns["labels"] == "/front/labels" and ns["labels/overlay"] == "/front/labels/overlay"
    topic = dict(camera_remaps("/front/image_raw/"))
    assert topic["image"] == "/front/image_raw" and topic["labels"] == "/front/labels"


def test_parameter_file_covers_every_parameter():
    params = yaml.safe_load((ROOT / "config" / "segment.yaml").read_text())["/**"]["ros__parameters"]
    assert set(params) == set(PARAMETERS)
    for name, value in params.items():
        assert type(value) is type(PARAMETERS[name][0]), name


def test_node_starts_from_the_parameter_file(tmp_path, tiny_model_dir, ros_domain_id):
    log = tmp_path / "node.log"
    proc = start_node_process(["--params-file", str(ROOT / "config" / "segment.yaml"), "-p", f"model:={tiny_model_dir}",
                               "-r", "__ns:=/front", "-r", "image:=/front/image_raw"], log)
    deadline = time.monotonic() + 60
    while "segmenting" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stop_process(proc) == 0, log.read_text()
    assert "segmenting /front/image_raw" in log.read_text() and "/front/labels" in log.read_text()


@pytest.mark.parametrize("param,message", [
    ("backend:=tensorflow", "backend must be"), ("qos_reliability:=sometimes", "qos_reliability"),
    ("overlay_alpha:=1.5", "overlay_alpha"), ("output_resolution:=half", "output_resolution"),
    ("inference_mode:=coarse_to_fine", "not offered"),
])
def test_bad_parameters_refused_clearly(tmp_path, tiny_model_dir, ros_domain_id, param, message):
    log = tmp_path / "node.log"
    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-p", param], log)
    proc.wait(timeout=60)
    assert proc.returncode == 2 and message in log.read_text()
