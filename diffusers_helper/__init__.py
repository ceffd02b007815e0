"""An independent implementation of FramePack next-frame-section video diffusion.

Importing this package does no work: no CUDA calls, no downloads, no model loads.
"""

__version__ = "0.1.0"
