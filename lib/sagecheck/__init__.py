"""sagecheck: does an 8-bit attention backend give the same answers as the FP16/BF16 baseline?"""

__version__ = "0.1.0"
