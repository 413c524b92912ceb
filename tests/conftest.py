"""Shared test setup. Keep it small and generic.

TRITON_INTERPRET must be set before anything imports triton (torch._inductor, torch.compile,
our Triton kernels): without a GPU, Triton kernels then run on the CPU interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Test tensors are tiny: intra-op threads only add OpenMP barrier overhead, which explodes when
# the machine is oversubscribed (measured here: a small HVP 10x slower with 2 threads under
# load). METAFLUENCE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("METAFLUENCE_TEST_THREADS", "1")))
