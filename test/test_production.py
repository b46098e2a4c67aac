"""The production node over real DDS: lifecycle, several cameras, camera_info, class table, idle, shutdown."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rclpy
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter as ParameterMsg, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from dgss_perception.codec import image_to_rgb
from dgss_perception.engine import Segmenter
from dgss_perception.labels import CITYSCAPES_CLASSES

from rosutil import RELIABLE, Collector, Spinner, init_context, start_node_process, stop_process, wait_for
from test_node import labels_array, make_image


class Driver:
    """A test node in this process with a background spinner."""

    def __init__(self, name: str = "production_driver") -> None:
        self.context = init_context()
        self.node = rclpy.create_node(name, context=self.context)
        self.spinner = Spinner(self.node)

    def call(self, srv_type, name: str, request, timeout: float = 20.0, attempt: float = 5.0):
        """Call an idempotent service, sending the request again every ``attempt`` seconds until it replies.

        A service seen by wait_for_service may not have matched the client's reply reader yet; DDS then
        drops that first reply, so a single request can go unanswered.
        """
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout), f"service {name} not available"
            deadline = time.monotonic() + timeout
            while True:
                future = client.call_async(request)
                try:
                    wait_for(future.done, min(attempt, max(0.1, deadline - time.monotonic())), f"reply from {name}")
                    return future.result()
                except AssertionError:
                    client.remove_pending_request(future)
                    if time.monotonic() >= deadline:
                        raise
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self.spinner.stop()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture
def driver(ros_domain_id):
    d = Driver()
    yield d
    d.close()


def send_and_wait(pub, labels: Collector, msg, timeout: float = 20.0) -> Image:
    pub.publish(msg)
    stamp = msg.header.stamp.sec
    wait_for(lambda: labels.find(lambda m: m.header.stamp.sec == stamp) is not None, timeout, f"labels {stamp}")
    return labels.find(lambda m: m.header.stamp.sec == stamp)


def lifecycle_state(driver: Driver, node: str) -> int:
    return driver.call(GetState, f"{node}/get_state", GetState.Request()).current_state.id


def transition(driver: Driver, node: str, transition_id: int) -> bool:
    return driver.call(ChangeState, f"{node}/change_state",
                       ChangeState.Request(transition=Transition(id=transition_id))).success


def test_lifecycle_transitions(tmp_path, tiny_model_dir, driver):
    # The module's entry point is the plain node; start the managed one (segment_lifecycle_node).
    proc = subprocess.Popen([sys.executable, "-c", "from dgss_perception.node import lifecycle_main; "
                             "raise SystemExit(lifecycle_main())", "--ros-args", "-p", f"model:={tiny_model_dir}",
                             "-p", "qos_reliability:=reliable", "-r", "__ns:=/lc"],
                            stdout=open(tmp_path / "lc.log", "w"), stderr=subprocess.STDOUT)
    node = "/lc/segment_node"
    pub = driver.node.create_publisher(Image, "/lc/image", RELIABLE)
    labels = Collector(driver.node, Image, "/lc/labels")
    try:
        assert lifecycle_state(driver, node) == State.PRIMARY_STATE_UNCONFIGURED
        time.sleep(0.5)
        assert labels.sub.get_publisher_count() == 0  # nothing loaded, nothing offered
        assert transition(driver, node, Transition.TRANSITION_CONFIGURE)
        assert lifecycle_state(driver, node) == State.PRIMARY_STATE_INACTIVE
        wait_for(lambda: labels.sub.get_publisher_count() == 1, 10, "labels publisher after configure")
        time.sleep(0.6)
        assert pub.get_subscription_count() == 0  # inactive: input not subscribed
        assert transition(driver, node, Transition.TRANSITION_ACTIVATE)
        wait_for(lambda: pub.get_subscription_count() == 1, 10, "input subscription after activate")
        out = send_and_wait(pub, labels, make_image(10, 64, 48, "bgr8"))
        assert (out.width, out.height) == (64, 48)
        assert transition(driver, node, Transition.TRANSITION_DEACTIVATE)
        wait_for(lambda: pub.get_subscription_count() == 0, 10, "input unsubscribed after deactivate")
        assert transition(driver, node, Transition.TRANSITION_CLEANUP)
        wait_for(lambda: labels.sub.get_publisher_count() == 0, 10, "publishers released after cleanup")
        assert lifecycle_state(driver, node) == State.PRIMARY_STATE_UNCONFIGURED
        # Parameters may change while unconfigured, and a bad one makes configure fail cleanly.
        bad = ParameterMsg(name="model", value=ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                              string_value=str(tmp_path / "missing")))
        assert driver.call(SetParameters, f"{node}/set_parameters",
                           SetParameters.Request(parameters=[bad])).results[0].successful
        assert not transition(driver, node, Transition.TRANSITION_CONFIGURE)
        assert lifecycle_state(driver, node) == State.PRIMARY_STATE_UNCONFIGURED
        good = ParameterMsg(name="model", value=ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                               string_value=str(tiny_model_dir)))
        driver.call(SetParameters, f"{node}/set_parameters", SetParameters.Request(parameters=[good]))
        assert transition(driver, node, Transition.TRANSITION_CONFIGURE)
        assert transition(driver, node, Transition.TRANSITION_ACTIVATE)
        out = send_and_wait(pub, labels, make_image(11, 30, 20, "mono8"))
        assert (out.width, out.height) == (30, 20)
        assert proc.poll() is None
    finally:
        assert stop_process(proc) == 0, (tmp_path / "lc.log").read_text()


def test_two_cameras_in_one_node(tmp_path, tiny_model_dir, driver):
    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-p", "qos_reliability:=reliable",
                               "-p", "cameras:=[front, rear]", "-p", "diagnostics_period:=0.3"],
                              tmp_path / "node.log")
    engine = Segmenter(tiny_model_dir, backend="onnx")
    pubs = {c: driver.node.create_publisher(Image, f"/{c}/image", RELIABLE) for c in ("front", "rear")}
    labels = {c: Collector(driver.node, Image, f"/{c}/labels") for c in ("front", "rear")}
    try:
        wait_for(lambda: all(p.get_subscription_count() for p in pubs.values()), 60, "both camera inputs")
        frames = {"front": make_image(20, 97, 61, "rgb8"), "rear": make_image(20, 50, 90, "bgr8")}
        frames["front"].header.frame_id, frames["rear"].header.frame_id = "front_optical", "rear_optical"
        for cam in ("front", "rear"):  # same stamp on both cameras: outputs must not mix
            pubs[cam].publish(frames[cam])
        for cam, msg in frames.items():
            wait_for(lambda c=cam: labels[c].messages, 20, f"{cam} labels")
            out = labels[cam].messages[0]
            assert out.header.frame_id == msg.header.frame_id and (out.width, out.height) == (msg.width, msg.height)
            np.testing.assert_array_equal(labels_array(out), engine.segment(image_to_rgb(msg)).labels)
        assert len(labels["front"].messages) == len(labels["rear"].messages) == 1
    finally:
        assert stop_process(proc) == 0, (tmp_path / "node.log").read_text()


def test_camera_info_matches_labels(tmp_path, tiny_model_dir, driver):
    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-p", "qos_reliability:=reliable",
                               "-p", "camera_info:=true", "-p", "output_resolution:=network", "-r", "__ns:=/ci"],
                              tmp_path / "node.log")
    pub = driver.node.create_publisher(Image, "/ci/image", RELIABLE)
    info_pub = driver.node.create_publisher(CameraInfo, "/ci/camera_info", RELIABLE)
    labels = Collector(driver.node, Image, "/ci/labels")
    infos = Collector(driver.node, CameraInfo, "/ci/labels/camera_info")
    try:
        wait_for(lambda: pub.get_subscription_count() and info_pub.get_subscription_count(), 60, "inputs")
        info = CameraInfo(header=Header(frame_id="ci_optical"), width=640, height=480, distortion_model="plumb_bob",
                          k=[500.0, 0, 320, 0, 510.0, 240, 0, 0, 1], p=[500.0, 0, 320, 0, 0, 510.0, 240, 0, 0, 0, 1, 0],
                          d=[0.1, 0.0, 0.0, 0.0, 0.0])
        info_pub.publish(info)
        time.sleep(0.5)
        msg = make_image(30, 640, 480, "rgb8")
        msg.header.frame_id = "ci_optical"
        out = send_and_wait(pub, labels, msg)
        wait_for(lambda: infos.messages, 10, "labels/camera_info")
        got = infos.messages[0]
        assert (got.width, got.height) == (out.width, out.height) == (84, 56)  # the network's grid
        assert got.header == out.header == msg.header
        sx, sy = 84 / 640, 56 / 480
        np.testing.assert_allclose(got.k, [500 * sx, 0, 320 * sx, 0, 510 * sy, 240 * sy, 0, 0, 1], rtol=1e-9)
        assert list(got.d) == list(info.d) and got.distortion_model == "plumb_bob"
    finally:
        assert stop_process(proc) == 0, (tmp_path / "node.log").read_text()


def test_class_table_parameter_and_refused_runtime_change(tmp_path, tiny_model_dir, driver):
    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-r", "__ns:=/meta"], tmp_path / "node.log")
    try:
        reply = driver.call(GetParameters, "/meta/segment_node/get_parameters",
                            GetParameters.Request(names=["class_table"]), timeout=60)
        table = json.loads(reply.values[0].string_value)
        assert [c["name"] for c in table] == list(CITYSCAPES_CLASSES) and table[13]["color"] == [0, 0, 142]
        change = ParameterMsg(name="overlay_alpha", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE,
                                                                         double_value=0.9))
        result = driver.call(SetParameters, "/meta/segment_node/set_parameters",
                             SetParameters.Request(parameters=[change])).results[0]
        assert not result.successful and "take effect when the model loads" in result.reason
    finally:
        assert stop_process(proc) == 0


def test_idle_while_unsubscribed(tmp_path, tiny_model_dir, driver):
    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-p", "qos_reliability:=reliable",
                               "-r", "__ns:=/idle"], tmp_path / "node.log")
    pub = driver.node.create_publisher(Image, "/idle/image", RELIABLE)
    try:
        wait_for(lambda: "segmenting" in (tmp_path / "node.log").read_text(), 60, "node up")
        time.sleep(1.0)
        assert pub.get_subscription_count() == 0  # nobody wants labels: input not even subscribed
        labels = Collector(driver.node, Image, "/idle/labels")
        wait_for(lambda: pub.get_subscription_count() == 1, 10, "input subscribed at the first subscriber")
        send_and_wait(pub, labels, make_image(40, 32, 24, "rgb8"))
        driver.node.destroy_subscription(labels.sub)
        wait_for(lambda: pub.get_subscription_count() == 0, 10, "input unsubscribed when the last one left")
    finally:
        assert stop_process(proc) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_clean_shutdown(tmp_path, tiny_model_dir, ros_domain_id, sig):
    log = tmp_path / "node.log"
    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-p", "lazy:=false", "-r", "__ns:=/sd"], log)
    wait_for(lambda: "segmenting" in log.read_text(), 60, "node up")
    t0 = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert proc.returncode == 0
    assert "Traceback" not in log.read_text()


def test_checksum_mismatch_refused_at_load(tmp_path, tiny_model_dir, ros_domain_id):
    pkg = shutil.copytree(tiny_model_dir, tmp_path / "pkg")
    with open(pkg / "whole.onnx", "ab") as f:
        f.write(b"\0")
    proc = start_node_process(["-p", f"model:={pkg}"], tmp_path / "node.log")
    proc.wait(timeout=60)
    assert proc.returncode == 2 and "checksum" in (tmp_path / "node.log").read_text()


@pytest.fixture(scope="module")
def batch2_model_dir(tmp_path_factory):
    """The tiny model exported with a batch of 2 (two cameras per inference)."""
    from conftest import make_tiny_weights
    from training.export import export_package

    work = tmp_path_factory.mktemp("batch2")
    cfg = make_tiny_weights(work / "w.safetensors")
    export_package(cfg, work / "w.safetensors", work / "pkg", batch=2)
    return work / "pkg"


def test_batched_engine_equals_single_frames(batch2_model_dir, tiny_model_dir):
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (61, 97, 3), dtype=np.uint8), rng.integers(0, 256, (90, 50, 3), dtype=np.uint8)]
    batched = Segmenter(batch2_model_dir, backend="onnx")
    single = Segmenter(tiny_model_dir, backend="onnx")
    assert batched.batch_size == 2 and single.batch_size == 1
    for both in (frames, frames[:1]):
        for r, rgb in zip(batched.segment_batch(both), both):
            ref = single.segment(rgb)
            assert r.labels.shape == rgb.shape[:2]
            assert (r.labels != ref.labels).mean() < 1e-3 and np.abs(r.confidence - ref.confidence).max() < 1e-4
    with pytest.raises(ValueError, match="1 to 2 frames"):
        batched.segment_batch(frames * 2)


def test_two_cameras_batched_in_one_inference(tmp_path, batch2_model_dir, tiny_model_dir, driver):
    proc = start_node_process(["-p", f"model:={batch2_model_dir}", "-p", "qos_reliability:=reliable",
                               "-p", "cameras:=[left, right]", "-p", "diagnostics_period:=0.3"],
                              tmp_path / "node.log")
    from diagnostic_msgs.msg import DiagnosticArray

    engine = Segmenter(tiny_model_dir, backend="onnx")
    pubs = {c: driver.node.create_publisher(Image, f"/{c}/image", RELIABLE) for c in ("left", "right")}
    labels = {c: Collector(driver.node, Image, f"/{c}/labels") for c in ("left", "right")}
    diag = Collector(driver.node, DiagnosticArray, "/diagnostics")
    try:
        wait_for(lambda: all(p.get_subscription_count() for p in pubs.values()), 60, "both camera inputs")
        for k in range(5):
            frames = {"left": make_image(50 + k, 97, 61, "rgb8"), "right": make_image(50 + k, 64, 40, "bgr8")}
            for cam in ("left", "right"):
                pubs[cam].publish(frames[cam])
            for cam, msg in frames.items():
                wait_for(lambda c=cam, s=50 + k: labels[c].find(lambda m: m.header.stamp.sec == s), 20, "labels")
                out = labels[cam].find(lambda m, s=50 + k: m.header.stamp.sec == s)
                assert (out.width, out.height) == (msg.width, msg.height)
                ref = engine.segment(image_to_rgb(msg)).labels
                assert (labels_array(out) != ref).mean() < 1e-3

        def values() -> dict:
            return {kv.key: kv.value for kv in diag.messages[-1].status[0].values} if diag.messages else {}
        wait_for(lambda: values().get("left/frames_processed") == values().get("right/frames_processed") == "5",
                 10, "diagnostics counting 5 frames per camera")
        values = values()
        assert 1.0 <= float(values["batch_mean"]) <= 2.0
    finally:
        assert stop_process(proc) == 0, (tmp_path / "node.log").read_text()


def test_label_info_published_latched(tmp_path, tiny_model_dir, driver):
    vision_msgs = pytest.importorskip("vision_msgs.msg", reason="vision_msgs comes with a ROS 2 install")
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-r", "__ns:=/li"], tmp_path / "node.log")
    try:
        wait_for(lambda: "segmenting" in (tmp_path / "node.log").read_text(), 60, "node up")
        time.sleep(0.5)  # subscribe late: transient local must still deliver
        qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
        info = Collector(driver.node, vision_msgs.LabelInfo, "/li/label_info", qos)
        wait_for(lambda: info.messages, 20, "label_info")
        assert [c.class_name for c in info.messages[0].class_map] == list(CITYSCAPES_CLASSES)
    finally:
        assert stop_process(proc) == 0
