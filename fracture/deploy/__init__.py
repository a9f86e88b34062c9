"""The deployed side: the onnxruntime predictor, the HTTP service and its page, site calibration, release checks. Torch-free: pip install . is enough."""
