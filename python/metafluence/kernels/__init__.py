"""Kernels that are not compiled into ``metafluence._C`` (Triton). Import lazily: importing
triton before ``TRITON_INTERPRET`` is set breaks the CPU interpreter."""
