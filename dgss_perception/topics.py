"""Topic naming shared by the launch file and the tools."""

from __future__ import annotations

IMAGE_SUFFIXES = ("image", "image_raw", "image_rect", "image_color", "image_rect_color", "image_mono")
OUTPUTS = ("labels", "labels/color", "labels/overlay", "labels/confidence", "labels/compressed", "labels/points",
           "labels/domain_shift")


def camera_remaps(camera: str) -> list[tuple[str, str]]:
    """Remappings that put segment_node on a camera.

    ``camera`` is a namespace (``/front`` → input ``/front/image``) or an image topic
    (``/front/image_raw``); outputs go to ``<camera namespace>/labels…``.
    """
    camera = camera.rstrip("/")
    if not camera:
        return []
    is_topic = camera.rsplit("/", 1)[-1] in IMAGE_SUFFIXES
    image = camera if is_topic else f"{camera}/image"
    root = camera.rsplit("/", 1)[0] if is_topic else camera
    return [("image", image), ("image/compressed", f"{image}/compressed")] + [(o, f"{root}/{o}") for o in OUTPUTS]
