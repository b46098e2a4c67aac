from glob import glob

from setuptools import find_packages, setup

package_name = "dgss_perception"

setup(
    name=package_name,
    version="0.1.0",
    # training/ stays out of what the ROS package installs: the node never pulls training dependencies.
    packages=find_packages(include=[package_name, f"{package_name}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"share/{package_name}", ["package.xml"]),
        (f"share/{package_name}/launch", glob("launch/*.launch.py")),
        (f"share/{package_name}/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    python_requires=">=3.10",
    # Compatible ranges for installing into an environment of one's own; the README's commands and CI
    # install the exact versions of requirements/lock.txt (scripts/lock_requirements.py refreshes it).
    install_requires=["numpy>=1.24", "opencv-python-headless>=4.8", "pyyaml>=6", "tqdm>=4.60", "rosbags>=0.10,<1"],
    extras_require={
        # ONNX Runtime, CPU or GPU build: both provide the module ``onnxruntime`` and must never be installed
        # side by side, so neither is a base requirement. ``gpu`` brings the CUDA 13 and cuDNN 9 wheels too.
        "cpu": ["onnxruntime>=1.18,<2"],
        "gpu": ["onnxruntime-gpu[cuda,cudnn]>=1.18,<2"],
        # rclpy and the messages from the ROS 2 wheels, for machines without a ROS 2 install: Kilted, or Jazzy.
        "ros": ["ros-kilted-rclpy[fastrtps]", "ros-kilted-sensor-msgs", "ros-kilted-std-msgs",
                "ros-kilted-diagnostic-msgs", "ros-kilted-geometry-msgs"],
        "ros-jazzy": ["ros-jazzy-rclpy[fastrtps]", "ros-jazzy-sensor-msgs", "ros-jazzy-std-msgs",
                      "ros-jazzy-diagnostic-msgs", "ros-jazzy-geometry-msgs"],
        "training": ["torch>=2.4,<3", "torchvision", "timm>=1.0.15,<2", "peft>=0.14,<1", "safetensors", "onnx>=1.16",
                     "onnxscript", "transformers>=4.45", "open_clip_torch>=2.26", "matplotlib", "pillow", "scipy"],
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "psutil"],
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis", "psutil", "flake8", "pydocstyle",
                "ros-kilted-ament-flake8", "ros-kilted-ament-pep257"],
    },
    zip_safe=True,
    maintainer="dgss_perception maintainers",
    maintainer_email="dgss-perception@example.com",
    description="Domain-generalized semantic segmentation for ROS 2: engine, node, rosbag tools.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "segment_node = dgss_perception.node:main",
            "segment_lifecycle_node = dgss_perception.node:lifecycle_main",
            "dgss-perception = dgss_perception.cli:main",
        ],
    },
)
