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
    install_requires=["numpy", "opencv-python-headless", "pyyaml", "tqdm", "rosbags>=0.10", "onnxruntime"],
    extras_require={
        # rclpy and the messages from the ROS 2 wheels, for machines without a ROS 2 install.
        "ros": ["ros-kilted-rclpy[fastrtps]", "ros-kilted-sensor-msgs", "ros-kilted-std-msgs",
                "ros-kilted-diagnostic-msgs", "ros-kilted-geometry-msgs"],
        "training": ["torch", "torchvision", "timm>=1.0.15", "peft>=0.14", "safetensors", "onnx",
                     "onnxscript", "transformers", "open_clip_torch", "matplotlib", "pillow", "scipy"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "psutil", "flake8", "pydocstyle", "ros-kilted-ament-flake8", "ros-kilted-ament-pep257"],
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
