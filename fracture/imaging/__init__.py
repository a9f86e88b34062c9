"""Image files to model inputs: decoding (the image gate, DICOM, EXIF), the preprocessing contract, resizing. Torch-free: numpy, OpenCV, Pillow."""
