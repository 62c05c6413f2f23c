"""Where kernel tests run: CUDA when Triton kernels run compiled (the GPU suite), else the CPU interpreter."""

import os

import torch

KERNEL_DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
