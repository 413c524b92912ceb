"""Fixtures shared by the bilevel tests (one toy problem, not a copy)."""

from tests.bilevel.test_validation import prob  # noqa: F401  (the `prob` fixture)
