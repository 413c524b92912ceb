"""metafluence: task-level and instance-level influence (removal effects) for meta-learning."""

# --- foundation exports (begin) ---
# --- foundation exports (end) ---
# --- core exports ---
from . import data as data  # noqa: E402
from . import distributed as distributed  # noqa: E402
from . import evaluate as evaluate  # noqa: E402
from . import inner as inner  # noqa: E402
from . import psg as psg  # noqa: E402
from . import solvers as solvers  # noqa: E402
from . import train as train  # noqa: E402
from ._build import build_info as build_info
from ._determinism import set_deterministic as set_deterministic
from ._malloc import keep_freed_memory as keep_freed_memory
from ._version import __version__ as __version__
from .bilevel import Curvature as Curvature  # noqa: E402
from .bilevel import MetaProblem as MetaProblem  # noqa: E402
from .bilevel import fit_curvature as fit_curvature  # noqa: E402
from .data.source import TaskSource as TaskSource  # noqa: E402
from .data.tasks import Task as Task  # noqa: E402
from .data.tasks import TaskBatch as TaskBatch  # noqa: E402
from .influence import InfluenceResult as InfluenceResult  # noqa: E402
from .influence import edit as edit  # noqa: E402
from .influence import param_influence as param_influence  # noqa: E402
from .influence import removal_effects as removal_effects  # noqa: E402
from .ops import psg_conv2d as psg_conv2d  # noqa: E402
from .ops import psg_conv2d_dot as psg_conv2d_dot  # noqa: E402
from .ops import psg_conv2d_sqnorm as psg_conv2d_sqnorm  # noqa: E402
from .ops import psg_linear as psg_linear
from .ops import psg_linear_dot as psg_linear_dot  # noqa: E402
from .ops import psg_linear_sqnorm as psg_linear_sqnorm  # noqa: E402
from .ops._dispatch import BackendUnavailableError as BackendUnavailableError
from .psg import per_sample_grad_dots as per_sample_grad_dots  # noqa: E402
from .psg import per_sample_grad_norms as per_sample_grad_norms  # noqa: E402
from .psg import per_sample_grads as per_sample_grads  # noqa: E402
