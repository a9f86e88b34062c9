"""The deployed side, torch-free (pip install . is enough): the core (metadata, the onnxruntime predictor, the CLI,
site calibration, release checks) and its rooms: ``serve`` (the HTTP service and its page) and ``pacs`` (the DICOM node)."""
