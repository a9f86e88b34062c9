"""fracture: bone-fracture classification on radiographs, trained with Lightning, shipped as ONNX.

A research tool, not a medical device.
"""

__version__ = "0.1.0"
