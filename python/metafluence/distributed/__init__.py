"""Sharding of tasks over ``torch.distributed`` ranks (gloo on CPU, nccl on GPU).

Wrap a problem once per process, after ``torch.distributed.init_process_group``::

    prob = mf.distributed.ShardedProblem(mf.MetaProblem(model, inner=...))
    res = mf.removal_effects(prob, lam, train_tasks, target=target_tasks)

Every rank passes the same ``train_tasks`` (a list, a dataset or a :class:`TaskSource`); each
reads and adapts only its contiguous block of tasks. Sums over tasks (``∇F``, ``H d``) become an
all-reduce of per-shard partial sums, per-item blocks (scores) are all-gathered in task order, so
every rank — rank 0 included — holds the same numbers as a single process (up to the order of
floating-point additions). Launch with ``torchrun --nproc-per-node N script.py`` or
``metafluence run --nproc N``.
"""

from ..bilevel.problem import shard_range
from .sharded import DistReduce, ShardedProblem, init_from_env

__all__ = ["DistReduce", "ShardedProblem", "init_from_env", "shard_range"]
