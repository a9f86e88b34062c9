"""fracture: bone-fracture classification on radiographs, trained with Lightning, shipped as ONNX.

A research tool, not a medical device.
"""

__version__ = "0.1.0"

import os as _os

# OpenCV's own decoder limit (default 2^30 pixels), set before any module imports cv2: a second guard behind
# fracture.imaging.preprocess's header check, at twice its default limit so that check always speaks first
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(200_000_000))
