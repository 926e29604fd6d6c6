"""lmq: quantize LLMs to 4 bits, pack them for a GPU generation, run them with Triton kernels."""

__version__ = "0.1.0"
