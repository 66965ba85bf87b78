"""The sgl-kernel version SGLang 0.5.23 pins (``sgl_kernel.__version__``)."""

__version__ = "0.4.10"
