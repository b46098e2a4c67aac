"""dgss_perception: domain-generalized semantic segmentation for ROS 2.

The runtime lives here: the model-package card, the inference engine (no rclpy),
the ROS 2 node, rosbag tools and the command line. Training and export live in
``training/`` beside this package in a checkout.
"""

__version__ = "0.1.0"
