"""LiDAR painting: cloud conversion, camera projection, stamp matching, and the node over real DDS."""

from __future__ import annotations

import array
import importlib.util

import cv2
import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from dgss_perception.cloud_painter import TF_AVAILABLE
from dgss_perception.painting import (FLOAT32, FLOAT64, PAINTED_FIELDS, UINT16, CameraModel, CloudError,
                                      StampMatcher, apply_transform, cloud_xyz, paint, painted_cloud_fields,
                                      read_fields, transform_matrix)

from rosutil import RELIABLE, Collector, Spinner, init_context, start_node_process, stop_process, wait_for

rng = np.random.default_rng(19)

# LiDAR (x forward, y left, z up) → camera optical frame (x right, y down, z forward), plus an offset.
LIDAR_TO_OPTICAL = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
TRANSLATION = np.array([0.1, -0.2, 0.05])
POSE = [*TRANSLATION, 0.5, -0.5, 0.5, 0.5]  # the same as [x, y, z, qx, qy, qz, qw]


def make_cloud(points: np.ndarray, big_endian: bool = False, row_pad: int = 0, height: int = 1,
               dtype: int = FLOAT32) -> PointCloud2:
    """A cloud with x, y, z (float32 or float64), intensity float32 and ring uint16, padded points and rows."""
    size = 4 if dtype == FLOAT32 else 8
    order = ">" if big_endian else "<"
    fields = [("intensity", 0, FLOAT32), ("x", 4, dtype), ("y", 4 + size, dtype), ("z", 4 + 2 * size, dtype),
              ("ring", 4 + 3 * size, UINT16)]
    step = 4 + 3 * size + 2 + 6  # padding after ring
    n = len(points)
    width = n // height
    np_types = {FLOAT32: "f4", FLOAT64: "f8", UINT16: "u2"}
    point_dtype = np.dtype({"names": [f[0] for f in fields], "offsets": [f[1] for f in fields],
                            "formats": [order + np_types[f[2]] for f in fields], "itemsize": step})
    structured = np.zeros(n, point_dtype)
    for axis, name in enumerate("xyz"):
        structured[name] = points[:, axis]
    structured["intensity"] = np.arange(n)
    structured["ring"] = np.arange(n) % 16
    rows = structured.view(np.uint8).reshape(height, width * step)
    padded = np.concatenate([rows, np.full((height, row_pad), 0xAB, np.uint8)], axis=1)
    msg = PointCloud2(header=Header(frame_id="lidar"), height=height, width=width,
                      fields=[PointField(name=f[0], offset=f[1], datatype=f[2], count=1) for f in fields],
                      is_bigendian=big_endian, point_step=step, row_step=width * step + row_pad, is_dense=False)
    msg.data = array.array("B", padded.tobytes())
    return msg


# -- conversion ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("big_endian,row_pad,height,dtype", [
    (False, 0, 1, FLOAT32), (True, 0, 1, FLOAT32), (False, 12, 4, FLOAT32), (True, 6, 2, FLOAT64),
    (False, 0, 3, FLOAT64)])
def test_cloud_xyz_reads_offsets_order_padding_and_drops_nan(big_endian, row_pad, height, dtype):
    points = rng.normal(size=(48, 3)) * 10
    points[[3, 17]] = np.nan
    points[40, 1] = np.inf
    msg = make_cloud(points, big_endian, row_pad, height, dtype)
    xyz = cloud_xyz(msg)
    finite = np.isfinite(points).all(axis=1)
    expected = points[finite].astype(np.float32 if dtype == FLOAT32 else np.float64)
    np.testing.assert_array_equal(xyz, expected.astype(np.float64))
    fields = read_fields(msg, ("ring", "intensity"))
    np.testing.assert_array_equal(fields["ring"], np.arange(48) % 16)
    np.testing.assert_array_equal(fields["intensity"], np.arange(48))


def test_malformed_clouds_raise_clear_errors():
    good = make_cloud(rng.normal(size=(8, 3)))
    cases = []
    m = make_cloud(rng.normal(size=(8, 3)))
    m.data = m.data[:50]  # truncated
    cases.append((m, "holds 50 bytes"))
    m = make_cloud(rng.normal(size=(8, 3)))
    m.fields = [f for f in m.fields if f.name != "z"]
    cases.append((m, "no field z"))
    m = make_cloud(rng.normal(size=(8, 3)))
    m.fields[1].datatype = 42
    cases.append((m, "unknown datatype 42"))
    m = make_cloud(rng.normal(size=(8, 3)))
    m.point_step = 8  # fields no longer fit a point
    m.row_step = 8 * m.width
    cases.append((m, "does not fit"))
    m = make_cloud(rng.normal(size=(8, 3)))
    m.row_step = 3
    cases.append((m, "row_step"))
    for msg, reason in cases:
        with pytest.raises(CloudError, match=reason):
            cloud_xyz(msg)
    assert cloud_xyz(good).shape == (8, 3)
    empty = make_cloud(np.zeros((0, 3)))
    assert cloud_xyz(empty).shape == (0, 3)


def painted_message(xyz: np.ndarray, labels: np.ndarray, confidence: np.ndarray) -> PointCloud2:
    fields = painted_cloud_fields(xyz, labels, confidence)
    fields["fields"] = [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields["fields"]]
    fields["data"] = array.array("B", fields["data"].tobytes())
    return PointCloud2(header=Header(frame_id="lidar"), **fields)


def test_painted_cloud_round_trip():
    xyz = rng.normal(size=(33, 3))
    labels = rng.integers(0, 19, 33).astype(np.uint8)
    confidence = rng.random(33).astype(np.float32)
    msg = painted_message(xyz, labels, confidence)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == list(PAINTED_FIELDS)
    assert msg.point_step * msg.width == msg.row_step == len(msg.data) and msg.is_dense and not msg.is_bigendian
    points = read_fields(msg)
    np.testing.assert_array_equal(points["label"], labels)
    np.testing.assert_array_equal(points["confidence"], confidence)
    np.testing.assert_array_equal(cloud_xyz(msg), xyz.astype(np.float32).astype(np.float64))


@pytest.mark.skipif(importlib.util.find_spec("sensor_msgs_py") is None,
                    reason="sensor_msgs_py comes with a ROS 2 install; the numpy reader is tested above")
def test_numpy_reader_agrees_with_sensor_msgs_py():  # pragma: no cover - needs a ROS 2 install
    from sensor_msgs_py import point_cloud2

    for msg in (make_cloud(rng.normal(size=(20, 3))), make_cloud(rng.normal(size=(20, 3)), row_pad=8, height=2),
                painted_message(rng.normal(size=(9, 3)), np.arange(9, dtype=np.uint8), rng.random(9))):
        theirs = point_cloud2.read_points(msg, skip_nans=False)
        ours = read_fields(msg)
        if msg.row_step == msg.width * msg.point_step:  # sensor_msgs_py does not skip row padding
            for name in ours.dtype.names:
                np.testing.assert_array_equal(ours[name], theirs[name])
        np.testing.assert_array_equal(cloud_xyz(msg), np.stack([ours[a] for a in "xyz"], -1).astype(np.float64))


# -- transforms and projection -----------------------------------------------------------------------
def test_transform_parameter_forms():
    m = transform_matrix(POSE)
    np.testing.assert_allclose(m[:3, :3], LIDAR_TO_OPTICAL, atol=1e-12)
    np.testing.assert_allclose(m[:3, 3], TRANSLATION)
    np.testing.assert_allclose(transform_matrix(m.reshape(-1).tolist()), m)
    assert transform_matrix([0.0] * 7) is None  # "not set"
    p = rng.normal(size=(5, 3))
    np.testing.assert_allclose(apply_transform(m, p), p @ LIDAR_TO_OPTICAL.T + TRANSLATION)
    for bad, reason in (([1.0, 2.0, 3.0], "7 numbers"), ([1.0, 0, 0, 0, 0, 0, 0], "quaternion"),
                        ([2.0] + [0.0] * 14 + [1.0], "orthonormal")):
        with pytest.raises(ValueError, match=reason):
            transform_matrix(bad)


def camera_info(width: int, height: int, model: str, d: list[float], skew: float = 0.0) -> CameraInfo:
    k = [0.6 * width, skew, width / 2 - 0.5, 0.0, 0.62 * width, height / 2 - 0.5, 0.0, 0.0, 1.0]
    p = [k[0], 0.0, k[2], 0.0, 0.0, k[4], k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
    return CameraInfo(header=Header(frame_id="camera_optical"), width=width, height=height, distortion_model=model,
                      d=d, k=k, p=p, r=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0])


@pytest.mark.parametrize("model,d", [
    ("plumb_bob", [-0.12, 0.03, 0.002, -0.001, 0.004]),
    ("plumb_bob", []),
    ("rational_polynomial", [0.3, -0.05, 0.001, 0.002, 0.01, 0.35, -0.04, 0.012]),
    ("equidistant", [0.05, -0.01, 0.003, -0.0005]),
])
def test_projection_matches_opencv(model, d):
    info = camera_info(640, 480, model, d)
    camera = CameraModel.from_camera_info(info)
    points = np.stack([rng.uniform(-6, 6, 500), rng.uniform(-4, 4, 500), rng.uniform(1.0, 12.0, 500)], -1)
    uv, keep = camera.project(points)
    k = np.array(info.k).reshape(3, 3)
    if model == "equidistant":
        ref, _ = cv2.fisheye.projectPoints(points[:, None], np.zeros(3), np.zeros(3), k, np.array(d))
    else:
        ref, _ = cv2.projectPoints(points, np.zeros(3), np.zeros(3), k, np.array(d, dtype=np.float64))
    ref = ref.reshape(-1, 2)
    np.testing.assert_allclose(uv, ref, atol=1e-6)
    inside = (ref[:, 0] >= -0.5) & (ref[:, 0] < 639.5) & (ref[:, 1] >= -0.5) & (ref[:, 1] < 479.5)
    np.testing.assert_array_equal(keep, inside)
    assert 50 < keep.sum() < 500  # both kinds present


def test_points_behind_too_close_or_folded_back_are_dropped():
    camera = CameraModel.from_camera_info(camera_info(640, 480, "plumb_bob", [-0.5, 0.0, 0.0, 0.0, 0.0]))
    # r_d = r (1 - 0.5 r²) peaks at r = 0.816: a point at r = 1.3 (52° off axis) folds back to r_d = 0.2.
    points = np.array([[0.0, 0.0, -5.0],   # behind: would project onto the centre
                       [0.0, 0.0, 0.05],   # closer than min depth
                       [1.3, 0.0, 1.0],    # outside the lens model's valid radius, folded into the image
                       [0.1, 0.05, 1.0]])  # a plain visible point
    uv, keep = camera.project(points, min_depth=0.1)
    assert 0 <= uv[2, 0] < 640  # the fold is real …
    np.testing.assert_array_equal(keep, [False, False, False, True])  # … and dropped


def test_rectified_projection_uses_p():
    info = camera_info(320, 240, "plumb_bob", [-0.3, 0.1, 0.0, 0.0, 0.0])
    info.p = [150.0, 0.0, 170.0, 0.0, 0.0, 160.0, 110.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    uv, keep = CameraModel.from_camera_info(info, rectified=True).project(np.array([[0.4, -0.2, 2.0]]))
    np.testing.assert_allclose(uv[0], [150 * 0.2 + 170, 160 * -0.1 + 110])
    assert keep[0]


def test_paint_takes_the_label_under_each_point_at_any_label_size():
    info = camera_info(200, 100, "plumb_bob", [])
    camera = CameraModel.from_camera_info(info)
    points = np.stack([rng.uniform(-2, 2, 300), rng.uniform(-1, 1, 300), rng.uniform(1.0, 3.0, 300)], -1)
    uv, visible = camera.project(points)
    for h, w in ((100, 200), (50, 100), (37, 61)):
        labels = rng.integers(0, 19, (h, w)).astype(np.uint8)
        confidence = rng.random((h, w)).astype(np.float32)
        index, painted, conf = paint(points, camera, labels, confidence)
        np.testing.assert_array_equal(index, np.nonzero(visible)[0])
        # The camera pixel's extent [u - 0.5, u + 0.5) scaled onto the label grid.
        col = np.floor((uv[index, 0] + 0.5) * w / 200).astype(int)
        row = np.floor((uv[index, 1] + 0.5) * h / 100).astype(int)
        np.testing.assert_array_equal(painted, labels[row, col])
        np.testing.assert_array_equal(conf, confidence[row, col])


def test_unusable_camera_info_is_refused():
    with pytest.raises(CloudError, match="not supported"):
        CameraModel.from_camera_info(camera_info(64, 48, "fov", [0.2]))
    no_k = camera_info(64, 48, "plumb_bob", [])
    no_k.k = [0.0] * 9
    with pytest.raises(CloudError, match="intrinsics"):
        CameraModel.from_camera_info(no_k)
    unsized = camera_info(64, 48, "plumb_bob", [])
    unsized.width = unsized.height = 0
    assert CameraModel.from_camera_info(unsized, size=(48, 64)).width == 64
    with pytest.raises(CloudError, match="size"):
        CameraModel.from_camera_info(unsized)


# -- stamp matching ------------------------------------------------------------------------------------
def test_stamp_matcher_waits_matches_nearest_and_never_guesses():
    ms = 1_000_000
    m: StampMatcher[str, str] = StampMatcher(tolerance_ns=30 * ms, depth=4, max_pending=3)
    assert m.add_cloud(100 * ms, "c100") == []  # no frame yet: waits
    assert m.add_frame(80 * ms, "f80") == []  # a later frame could still be closer
    assert m.add_frame(110 * ms, "f110") == [("c100", "f110")]  # 10 ms beats 20 ms
    assert m.add_cloud(97 * ms, "c97") == [("c97", "f110")]  # decided at once: a frame after it exists
    assert m.add_cloud(200 * ms, "c200") == []
    assert m.add_frame(260 * ms, "f260") == [("c200", None)]  # nearest frames 90 and 60 ms away: unmatched
    assert m.add_cloud(260 * ms, "c260") == [("c260", "f260")]  # exact
    # Too many waiting: the oldest is given up (counted), never painted with a later frame.
    decided = [d for s in (300, 310, 320, 330) for d in m.add_cloud(s * ms, f"c{s}")]
    assert decided == [("c300", None)]
    assert m.add_frame(325 * ms, "f325") == [("c310", "f325"), ("c320", "f325")]
    # Time jumps back (a bag restarted): older frames are forgotten, not matched across the jump.
    assert m.add_frame(10 * ms, "f10") == [("c330", None)]
    assert list(m.frames) == [(10 * ms, "f10")]


# -- the node over real DDS ---------------------------------------------------------------------------
def stamp(sec: int, nanosec: int = 0) -> Time:
    return Time(sec=sec, nanosec=nanosec)


def scene() -> tuple[np.ndarray, dict[str, slice]]:
    """LiDAR points (x forward, y left, z up, metres): a road plane, a box on it, points behind and beside."""
    parts = {}
    road = np.stack([rng.uniform(2.0, 25.0, 400), rng.uniform(-8.0, 8.0, 400), np.full(400, -1.6)], -1)
    box_front = np.stack([np.full(150, 7.0), rng.uniform(-1.0, 1.0, 150), rng.uniform(-1.6, 0.4, 150)], -1)
    box_side = np.stack([rng.uniform(7.0, 9.0, 100), np.full(100, -1.0), rng.uniform(-1.6, 0.4, 100)], -1)
    behind = np.stack([rng.uniform(-20.0, -0.5, 150), rng.uniform(-5, 5, 150), rng.uniform(-1.6, 1.0, 150)], -1)
    beside = np.stack([rng.uniform(1.0, 3.0, 100), rng.uniform(8.0, 15.0, 100) * rng.choice([-1, 1], 100),
                       rng.uniform(-1.6, 1.0, 100)], -1)
    nan = np.full((5, 3), np.nan)
    start = 0
    for name, block in (("road", road), ("box", np.concatenate([box_front, box_side])), ("behind", behind),
                        ("beside", beside), ("nan", nan)):
        parts[name] = slice(start, start + len(block))
        start += len(block)
    return np.concatenate([road, box_front, box_side, behind, beside, nan]), parts


@pytest.fixture(scope="module")
def painting_node(tmp_path_factory, tiny_model_dir, ros_domain_id):
    tmp = tmp_path_factory.mktemp("painting")
    log = tmp / "node.log"
    pose = "[" + ",".join(f"{v:.6f}" for v in POSE) + "]"
    proc = start_node_process(
        ["-p", f"model:={tiny_model_dir}", "-p", "backend:=onnx", "-p", "qos_reliability:=reliable",
         "-p", "painting:=true", "-p", "camera_info:=true", "-p", "pointcloud_topic:=/lidar/points",
         "-p", f"lidar_to_camera:={pose}", "-p", "painting_stamp_tolerance:=0.03", "-p", "diagnostics_period:=0.3",
         "-r", "__ns:=/paint"], log)
    context = init_context()
    node = rclpy.create_node("painting_test_driver", context=context)
    h = type("Driver", (), {})()
    h.proc, h.log, h.context, h.node = proc, log, context, node
    h.image = node.create_publisher(Image, "/paint/image", RELIABLE)
    h.info = node.create_publisher(CameraInfo, "/paint/camera_info", RELIABLE)
    h.cloud = node.create_publisher(PointCloud2, "/lidar/points", RELIABLE)
    h.labels = Collector(node, Image, "/paint/labels")
    h.confidence = Collector(node, Image, "/paint/labels/confidence")
    h.label_info = Collector(node, CameraInfo, "/paint/labels/camera_info")
    h.points = Collector(node, PointCloud2, "/paint/labels/points")
    h.diag = Collector(node, DiagnosticArray, "/diagnostics")
    spinner = Spinner(node)
    try:
        # Lazy: the node subscribes the image, camera_info and the cloud because labels/points has a subscriber.
        wait_for(lambda: proc.poll() is None and h.image.get_subscription_count() > 0
                 and h.info.get_subscription_count() > 0 and h.cloud.get_subscription_count() > 0, 60,
                 f"segment_node to subscribe (log: {log.read_text()})")
        yield h
    finally:
        spinner.stop()
        node.destroy_node()
        rclpy.shutdown(context=context)
        assert stop_process(proc) == 0, log.read_text()


def diagnostics(h) -> dict[str, str]:
    return {kv.key: kv.value for kv in h.diag.messages[-1].status[0].values} if h.diag.messages else {}


def mono(msg: Image) -> np.ndarray:
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width)


def test_node_paints_the_scene_over_dds(painting_node):
    h = painting_node
    # camera_info at twice the image's size: labels come at the image's size, pixels scale by ½.
    info = camera_info(192, 128, "plumb_bob", [-0.05, 0.01, 0.001, -0.001, 0.0])
    width, height = 96, 64
    gen = np.random.default_rng(5)
    # First a frame whose republished camera_info proves the node holds the camera's calibration.
    for sec in (100, 101):
        info.header.stamp = stamp(sec)
        h.info.publish(info)
        frame = Image(header=Header(stamp=stamp(sec), frame_id="camera_optical"), height=height, width=width,
                      encoding="rgb8", step=width * 3,
                      data=array.array("B", gen.integers(0, 256, height * width * 3, dtype=np.uint8).tobytes()))
        if sec == 100:
            h.image.publish(frame)
            wait_for(lambda: h.label_info.find(lambda m: m.header.stamp.sec == 100), 30, "labels/camera_info")
    points, parts = scene()
    cloud = make_cloud(points)
    cloud.header = Header(stamp=stamp(101, 20_000_000), frame_id="lidar")  # 20 ms after the image: within 30 ms
    h.cloud.publish(cloud)  # before its image: it waits for the labels
    h.image.publish(frame)
    wait_for(lambda: h.labels.find(lambda m: m.header.stamp.sec == 101), 30, "labels")
    # The cloud is stamped after that image: a later image could lie closer, so it waits for the next one
    # (180 ms after it, beyond the tolerance) before taking the image 20 ms before it.
    later = Image(header=Header(stamp=stamp(101, 200_000_000), frame_id="camera_optical"), height=height,
                  width=width, encoding="rgb8", step=width * 3,
                  data=array.array("B", gen.integers(0, 256, height * width * 3, dtype=np.uint8).tobytes()))
    h.image.publish(later)
    try:
        wait_for(lambda: h.points.find(lambda m: m.header.stamp.sec == 101), 30, "the painted cloud")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; diagnostics {diagnostics(h)}; log:\n{h.log.read_text()}") from None
    out = h.points.find(lambda m: m.header.stamp.sec == 101)
    first = lambda m: (m.header.stamp.sec, m.header.stamp.nanosec) == (101, 0)  # noqa: E731
    labels = mono(h.labels.find(first))
    wait_for(lambda: h.confidence.find(first), 10, "confidence")
    confidence = mono(h.confidence.find(first)).astype(np.float32) / 255
    wait_for(lambda: h.labels.find(lambda m: m.header.stamp.nanosec == 200_000_000), 10, "the later labels")
    later_labels = mono(h.labels.find(lambda m: m.header.stamp.nanosec == 200_000_000))
    assert (later_labels != labels).mean() > 0.2  # so the test tells which image painted the cloud

    assert out.header.frame_id == "lidar" and out.header.stamp.nanosec == 20_000_000
    assert [(f.name, f.offset, f.datatype) for f in out.fields] == [f[:3] for f in PAINTED_FIELDS]
    painted = read_fields(out)

    # The truth, independently: OpenCV projects the float32 points with the same pose and calibration.
    xyz = points.astype(np.float32).astype(np.float64)
    finite = np.isfinite(xyz).all(axis=1)
    optical = xyz @ LIDAR_TO_OPTICAL.T + TRANSLATION
    uv, _ = cv2.projectPoints(np.where(finite[:, None], optical, 1.0), np.zeros(3), np.zeros(3),
                              np.array(info.k).reshape(3, 3), np.array(info.d))
    uv = uv.reshape(-1, 2)
    visible = finite & (optical[:, 2] > 0.1) & (uv[:, 0] >= -0.5) & (uv[:, 0] < 191.5) & (uv[:, 1] >= -0.5) & (
        uv[:, 1] < 127.5)
    for name in ("behind", "beside", "nan"):
        assert not visible[parts[name]].any()  # the scene is built so
    assert visible[parts["road"]].sum() > 50 and visible[parts["box"]].all()
    kept = np.stack([painted[a] for a in "xyz"], -1).astype(np.float64)
    np.testing.assert_array_equal(kept, xyz[visible])  # x, y, z kept as received, in the LiDAR frame
    col = np.floor((uv[visible, 0] + 0.5) / 2).astype(int)
    row = np.floor((uv[visible, 1] + 0.5) / 2).astype(int)
    np.testing.assert_array_equal(painted["label"], labels[row, col])
    np.testing.assert_allclose(painted["confidence"], confidence[row, col], atol=3e-3)  # mono8 and float16 rounding
    road, box = slice(0, visible[parts["road"]].sum()), slice(visible[parts["road"]].sum(), None)
    assert len(painted["label"][road]) > 50 and len(painted["label"][box]) == 250


def test_node_counts_unmatched_and_malformed_clouds(painting_node):
    h = painting_node
    wait_for(lambda: "clouds_received" in diagnostics(h), 20, "painting diagnostics")
    before = {k: int(v) for k, v in diagnostics(h).items() if k.startswith("clouds_")}
    old = make_cloud(scene()[0])
    old.header = Header(stamp=stamp(50), frame_id="lidar")  # long before any label image: never painted
    h.cloud.publish(old)
    wait_for(lambda: int(diagnostics(h).get("clouds_unmatched", 0)) == before["clouds_unmatched"] + 1, 20,
             "the unmatched cloud counted")
    bad = make_cloud(scene()[0])
    bad.header.stamp = stamp(60)
    bad.data = bad.data[:100]
    h.cloud.publish(bad)
    wait_for(lambda: int(diagnostics(h).get("clouds_malformed", 0)) == before["clouds_malformed"] + 1, 20,
             "the malformed cloud counted")
    assert h.proc.poll() is None
    assert not h.points.find(lambda m: m.header.stamp.sec in (50, 60))


def test_node_takes_the_cloud_only_while_its_painted_cloud_is_wanted(painting_node):
    h = painting_node
    assert h.cloud.get_subscription_count() == 1
    h.node.destroy_subscription(h.points.sub)
    wait_for(lambda: h.cloud.get_subscription_count() == 0, 10, "the cloud unsubscribed")
    assert h.image.get_subscription_count() == 1  # the labels still have a subscriber
    h.points = Collector(h.node, PointCloud2, "/paint/labels/points")
    wait_for(lambda: h.cloud.get_subscription_count() == 1, 10, "the cloud subscribed again")


@pytest.mark.parametrize("params,message", [
    (["lidar_to_camera:=[1.0, 2.0, 3.0]"], "lidar_to_camera takes 7 numbers"),
    (["painting_stamp_tolerance:=-0.1"], "painting_stamp_tolerance must be"),
    ([], "set lidar_to_camera"),  # no transform: neither the parameter nor TF
])
def test_bad_painting_parameters_refused_clearly(tmp_path, tiny_model_dir, ros_domain_id, params, message):
    if not params and TF_AVAILABLE:
        pytest.skip("tf2_ros is importable: the transform comes from TF")
    log = tmp_path / "node.log"
    pose = "lidar_to_camera:=[" + ",".join(f"{v:.6f}" for v in POSE) + "]"
    args = ["-p", pose] if params and "lidar_to_camera" not in params[0] else []
    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-p", "painting:=true", *args,
                               *[a for p in params for a in ("-p", p)]], log)
    proc.wait(timeout=60)
    assert proc.returncode == 2 and message in log.read_text(), log.read_text()
