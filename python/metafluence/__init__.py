"""metafluence: task-level and instance-level influence (removal effects) for meta-learning."""

# --- foundation exports (begin) ---
from ._build import build_info as build_info
from ._version import __version__ as __version__
from .ops import psg_linear as psg_linear
from .ops._dispatch import BackendUnavailableError as BackendUnavailableError
# --- foundation exports (end) ---
