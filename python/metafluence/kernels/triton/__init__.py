"""Triton kernels, one op per file. Each module imports triton at import time: import them only
once a Triton backend has been chosen (see :mod:`metafluence.ops._dispatch`)."""
