"""The curvature of a job: how every total solve ``(H + δ'I) x = b`` is done (fit once, reuse).

A :class:`Curvature` holds

- ``kind``: which total Hessian ``H`` (``"exact"``, ``"gauss_newton"``, ``"gamma"``; math.md §2;
  the objective's damping ``δ`` is part of ``H``);
- ``solve_damping`` ``δ' ≥ 0``: added to ``H`` in solves only (predicts the proximal response).
  This object is the one place where ``δ'`` meets the operator;
- ``method``: what is built once at ``(λ*, tasks)`` and reused by every solve there:

  * ``"krylov"``: nothing (each solve runs ``solver`` — CG by default — on ``H + δ'I``);
  * ``"dense"``: ``H = Q Λ Qᵀ`` by one eigendecomposition (``P`` total-HVP rows, small ``P``
    only); every solve is then ``x = Q (Λ + δ')⁻¹ Qᵀ b``, exact, with no further pass over the
    tasks, and the extreme eigenvalues are exact;
  * ``"lowrank"``: a randomized eigendecomposition ``H ≈ U Λ Uᵀ + τ (I − UUᵀ)`` of rank ``r``
    (``power_iters + 2`` passes of ``r``-row HVPs; ``τ`` the smallest kept ``|Λ|``). Used as the
    preconditioner of CG (``solver="cg"``: Nyström-style PCG, the same answer in fewer
    iterations) or directly (``solver="approx"``: ``x = U (Λ+δ')⁻¹ Uᵀ b + (b − UUᵀb)/(τ+δ')``,
    no pass over the tasks per solve);
  * ``"secant"``: the same form ``U Λ Uᵀ + τ (I − UUᵀ)`` from the secant pairs ``(s_j, y_j)``,
    ``y_j = ∇F(λ_{j+1}) − ∇F(λ_j) ≈ H s_j``, that the stationarity phase's L-BFGS collected on
    its way to ``λ*`` (:func:`secant_eigenpairs`: Rayleigh-Ritz on ``span(S)``). The pairs are
    free (they are training's own gradients); only the tail ``τ`` costs ``tail_probes`` HVP
    rows (one batched pass; 0: ``τ`` = the smallest ``|Ritz value|``). Exact curvature only
    (differences of ``∇F`` measure the exact ``H``, ``δ`` included).

- ``solver`` and ``options`` (the solver's keyword arguments: ``rtol``, ``maxiter``, ...);
- ``horizon`` ``t`` (optional): instead of ``(H + δ'I)⁻¹ b`` every solve returns the response of
  *training for a time t* from ``λ*``, ``φ_t(A) b = A⁻¹ (I − e^{−tA}) b`` with ``A = H + δ'I``
  (gradient flow linearised at ``λ*``; ``t = η·T`` for ``T`` steps of size ``η``). It is the
  estimator for a ``λ*`` that is not stationary (a single-segment version of SOURCE, Bae et al.
  2024, "training-dynamics-aware influence"): flat directions get ``φ → t`` instead of ``1/λ → ∞``
  and negative curvature follows the dynamics; as ``t → ∞`` on a positive definite ``A`` it is
  the ordinary solve. Scores then predict "train ``t`` longer without the item" minus "train
  ``t`` longer with it" (the continued-training control). Needs a fitted eigendecomposition
  (``dense``, ``lowrank``, ``secant``).

A fitted curvature is bound to the point it was fitted at (a digest of ``λ*``, the tasks and
their weights): solving at that point uses the factorisation; at any other point (Newton
corrections, retraining checks) it runs ``solver`` there (a low-rank fit still preconditions,
the dense fit becomes a dense solve). Several right-hand sides go through one batched solve.
:func:`fit_curvature` builds one; :meth:`Curvature.save` / :meth:`Curvature.load` store it with
a checksum (the checkpoint store keeps it beside the solve).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._checks import MAX_DAMPING, check_float, check_int
from .._store import digest, load_tensors, save_tensors
from ..solvers import SOLVERS, SolveResult, get_solver
from ..solvers._base import default_rtol, eps, relative_residual
from .point import CURVATURES, BilevelPoint, check_curvature

METHODS = ("krylov", "dense", "lowrank", "secant")
LOWRANK = ("lowrank", "secant")  # methods with the form U Λ Uᵀ + τ (I − UUᵀ)
# "approx": the low-rank inverse used directly; "auto" (with method "auto"): dense or CG by P
SOLVE_MODES = (*SOLVERS, "approx", "auto")
AUTO_DENSE_MAX = 1024  # "auto": dense eigendecomposition up to this P (P HVP rows, once)
DENSE_MAX = 8192


def check_solve_damping(solve_damping: float) -> float:
    """``δ'``: a finite float in ``[0, 1e30]`` (not a bool, not a string; larger values make
    ``H + δ'I`` unrepresentable in float32 norms)."""
    return check_float(solve_damping, "solve_damping", minimum=0.0, maximum=MAX_DAMPING)


@dataclasses.dataclass
class Curvature:
    """How every total solve of a job is done (module docstring). Build with
    :func:`fit_curvature`; an unfitted ``Curvature(kind, "krylov", solver, δ')`` is the plain
    Krylov curvature a string ``curvature=`` stands for."""

    kind: str = "exact"
    method: str = "krylov"
    solver: str = "cg"
    solve_damping: float = 0.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    eigvecs: Tensor | None = dataclasses.field(default=None, repr=False)  # [P, r]
    eigvals: Tensor | None = dataclasses.field(default=None, repr=False)  # [r]
    tail: float | None = None
    fitted_at: str | None = None
    fit_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    horizon: float | None = None
    # the last in-memory point a solve stood on, (problem, point digest, point): see point()
    _last: tuple[Any, str, BilevelPoint] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_curvature(self.kind)
        if self.horizon is not None:
            self.horizon = check_float(self.horizon, "horizon", positive=True)
            if self.method not in ("dense", *LOWRANK):
                raise ValueError(
                    f"horizon needs a fitted eigendecomposition (method 'dense', 'lowrank' or "
                    f"'secant'), not method={self.method!r}"
                )
        if self.method not in (*METHODS, "auto"):
            raise ValueError(f"method={self.method!r}: expected one of {(*METHODS, 'auto')}")
        if self.solver not in SOLVE_MODES:
            raise ValueError(f"solver={self.solver!r}: expected one of {SOLVE_MODES}")
        if (self.method == "auto") != (self.solver == "auto"):
            raise ValueError("method='auto' and solver='auto' go together (resolved by P)")
        if self.solver == "approx" and self.method not in LOWRANK:
            raise ValueError(
                f"solver='approx' uses a low-rank fit: it needs method in {LOWRANK}, not "
                f"{self.method!r}"
            )
        self.solve_damping = check_solve_damping(self.solve_damping)
        if not isinstance(self.options, Mapping):
            raise TypeError(f"options must be a dict of solver arguments, got {self.options!r}")
        self.options = dict(self.options)

    # ---- state ---------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self.fitted_at is not None

    def point(
        self,
        problem: Any,
        meta_params: Any,
        tasks: Any,
        task_weight: Tensor | None = None,
    ) -> BilevelPoint:
        """``problem.point(meta_params, tasks, task_weight)`` — the same point again when the
        same problem asks at an equal ``λ`` with equal tasks and weights (one digest).

        A fitted curvature keeps its last in-memory point, and with it the linearisation its
        products built (:meth:`Engine.linearised`), so the solves of one job at ``λ*`` — the
        scores, every edit, the Newton check — share one gradient graph instead of building
        one each. The point holds that memory until another point replaces it or
        :meth:`release`; an unfitted curvature (a string ``curvature=``) keeps nothing.
        """
        pt = problem.point(meta_params, tasks, task_weight)
        if not self.fitted or pt.source is not None:
            return pt
        key = point_digest(pt)
        last = self._last
        if last is not None and last[0] is problem and last[1] == key:
            return last[2]
        self._last = (problem, key, pt)
        return pt

    def release(self) -> None:
        """Drop the point :meth:`point` keeps (and the memory of its linearisation)."""
        self._last = None

    def fits(self, pt: BilevelPoint) -> bool:
        """Whether this curvature was fitted at ``pt`` (same ``λ``, tasks and weights)."""
        return self.fitted and self.fitted_at == point_digest(pt)

    def config(self) -> dict[str, Any]:
        """What a stored result solved with (for the checkpoint store's fingerprint)."""
        opts = {str(k): _plain_or_digest(v) for k, v in self.options.items()}
        fit = None
        if self.fitted:
            fit = digest({"at": self.fitted_at, "U": self.eigvecs, "L": self.eigvals})
        return {
            "curvature": self.kind,
            "method": self.method,
            "solver": self.solver,
            "solve_damping": float(self.solve_damping),
            "solver_kwargs": opts,
            "fit": fit,
            "horizon": self.horizon,
        }

    def unfitted(self) -> Curvature:
        """The same kind, solver and ``δ'`` without a factorisation (plain Krylov)."""
        solver = "cg" if self.solver == "approx" else self.solver
        return Curvature(self.kind, "krylov", solver, self.solve_damping, dict(self.options))

    # ---- operators -----------------------------------------------------------------------
    def operator(self, pt: BilevelPoint):
        """``X ↦ (H + δ'I) X`` at ``pt`` on ``[P]`` or ``[k, P]`` (the solve's matrix)."""
        mv = pt.matvec(self.kind)
        dp = self.solve_damping

        def op(X: Tensor) -> Tensor:
            return mv(X) + dp * X

        return op

    def _approx_inverse(self, B: Tensor, spd: bool) -> Tensor:
        """``U (Λ+δ')⁻¹ UᵀB + (B − UUᵀB)/(τ+δ')`` for rows ``B [k, P]`` (``spd``: ``|Λ|``)."""
        assert self.eigvals is not None and self.tail is not None
        lam = self.eigvals.to(B.dtype)
        if spd:
            lam = lam.abs()
        dp = self.solve_damping
        return self._spectral(B, 1.0 / (lam + dp), 1.0 / (abs(self.tail) + dp))

    def _spectral(self, B: Tensor, on_span: Tensor, on_rest: Tensor | float | None) -> Tensor:
        """``U diag(on_span) UᵀB + on_rest · (B − UUᵀB)`` for rows ``B [k, P]``: a function of
        the fitted ``UΛUᵀ + τ(I − UUᵀ)`` (``on_rest=None``: no complement, a dense fit)."""
        assert self.eigvecs is not None
        U = self.eigvecs.to(B.dtype)
        C = B @ U  # [k, r]
        X = (C * on_span) @ U.T
        return X if on_rest is None else X + on_rest * (B - C @ U.T)

    # ---- solves --------------------------------------------------------------------------
    def solve(self, pt: BilevelPoint, b: Tensor) -> SolveResult:
        """``(H + δ'I)⁻¹ b`` at ``pt`` for ``b [P]`` or ``[k, P]`` (rows: one batched solve)."""
        if self.method == "auto":
            return resolve_auto(self, pt).solve(pt, b)
        one = b.dim() == 1
        B = b.unsqueeze(0) if one else b
        here = self.fits(pt)  # (one digest of λ per solve)
        if self.horizon is not None:
            if not here:
                raise ValueError(
                    "a horizon curvature answers at the point it was fitted at only (the "
                    "response of training from there); fit one at this point"
                )
            res = self._horizon_solve(B)
        elif here and self.method == "dense":
            res = self._dense_solve(B)
        elif here and self.solver == "approx":
            res = self._approx_solve(pt, B)
        elif self.method == "dense" and self.fitted:  # elsewhere: a dense solve there
            res = get_solver("direct")(pt.matvec(self.kind), B, damping=self.solve_damping)
        else:
            kw = dict(self.options)
            if self.method in LOWRANK and self.fitted and self.solver == "cg":
                kw.setdefault("precond", lambda R: self._approx_inverse(R, spd=True))
            solver = "cg" if self.solver == "approx" else self.solver
            # always [k, P]: solvers then apply the operator to all rows in one batched call
            res = get_solver(solver)(pt.matvec(self.kind), B, damping=self.solve_damping, **kw)
        if one:
            cc = res.column_converged
            res = dataclasses.replace(
                res,
                x=res.x[0],
                residual=res.residual.reshape(()),
                column_converged=None if cc is None else cc.reshape(()),
            )
        return res

    def _dense_solve(self, B: Tensor) -> SolveResult:
        assert self.eigvecs is not None and self.eigvals is not None
        Q, lam = self.eigvecs.to(B.dtype), self.eigvals.to(B.dtype) + self.solve_damping
        cutoff = lam.abs().max() * lam.numel() * eps(B.dtype)  # as solve_direct's eigh path
        keep = lam.abs() > cutoff
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), 0.0)
        C = B @ Q
        X = (C * inv) @ Q.T
        R = B - ((X @ Q) * lam) @ Q.T
        res = relative_residual(
            torch.linalg.vector_norm(R, dim=1), torch.linalg.vector_norm(B, dim=1)
        )
        tol = float(self.options.get("rtol", default_rtol(B.dtype)))
        col = res <= tol
        neg = bool((lam <= 0).any())
        return SolveResult(
            X, 0, res, bool(col.all()), col, neg, {"method": "dense", "matvec_calls": 0}
        )

    def _horizon_solve(self, B: Tensor) -> SolveResult:
        """``φ_t(A) B`` on the fit: ``U φ_t(Λ + δ') UᵀB`` (dense: exact), plus
        ``φ_t(τ + δ') (B − UUᵀB)`` on the complement of a low-rank or secant fit;
        ``φ_t(a) = (1 − e^{−ta})/a`` (``= t`` at ``a = 0``)."""
        assert self.eigvals is not None and self.horizon is not None
        lam = self.eigvals.to(B.dtype) + self.solve_damping
        rest = None
        if self.method != "dense":
            assert self.tail is not None
            rest = _flow(B.new_tensor(abs(self.tail) + self.solve_damping), self.horizon)
        X = self._spectral(B, _flow(lam, self.horizon), rest)
        zero = B.new_zeros(B.shape[0])
        col = torch.ones(B.shape[0], dtype=torch.bool, device=B.device)
        info = {"method": f"horizon t={self.horizon:g} on the {self.method} fit"}
        return SolveResult(X, 0, zero, True, col, bool((lam < 0).any()), info)

    def _approx_solve(self, pt: BilevelPoint, B: Tensor) -> SolveResult:
        X = self._approx_inverse(B, spd=False)
        check = bool(self.options.get("check_residual", True))
        if check:  # one batched operator pass: an honest residual of the approximation
            R = B - self.operator(pt)(X)
            res = relative_residual(
                torch.linalg.vector_norm(R, dim=1), torch.linalg.vector_norm(B, dim=1)
            )
        else:
            res = torch.full((B.shape[0],), float("nan"), dtype=B.dtype, device=B.device)
        tol = float(self.options.get("rtol", 1e-2))
        col = res <= tol if check else torch.ones(B.shape[0], dtype=torch.bool)
        return SolveResult(X, 0, res, bool(col.all()), col, False, {"method": "lowrank-approx"})

    # ---- spectrum ------------------------------------------------------------------------
    def extreme_eigenvalues(self) -> tuple[float, float] | None:
        """Exact ``(λ_min, λ_max)`` of ``H + δ'I`` from a dense fit (``None`` otherwise)."""
        return self._shifted_extremes(("dense",))

    def ritz_extremes(self) -> tuple[float, float] | None:
        """``(θ_min, θ_max)`` of ``H + δ'I`` on the span of a low-rank or secant fit (``None``
        otherwise): Ritz values, so ``θ_min ≥ λ_min`` and ``θ_max ≤ λ_max`` (bounds of the
        same sense as a Lanczos estimate's, at no cost; for a secant fit only approximately:
        its pairs measure ``H`` along the path to ``λ*``)."""
        return self._shifted_extremes(LOWRANK)

    def _shifted_extremes(self, methods: tuple[str, ...]) -> tuple[float, float] | None:
        """``(min, max)`` of the fitted eigenvalues plus ``δ'`` for a fit of ``methods``."""
        if self.method not in methods or self.eigvals is None or self.eigvals.numel() == 0:
            return None
        ev = self.eigvals.double() + self.solve_damping
        return float(ev.min()), float(ev.max())

    # ---- storage -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Store the curvature (factorisation, fit point, settings) atomically, checksummed."""
        tensors: dict[str, Tensor] = {}
        if self.eigvecs is not None and self.eigvals is not None:
            tensors = {"eigvecs": self.eigvecs, "eigvals": self.eigvals}
        opts = {str(k): v for k, v in self.options.items() if _jsonable(v)}
        if len(opts) != len(self.options):
            dropped = sorted(set(map(str, self.options)) - set(opts))
            warnings.warn(f"Curvature.save: options {dropped} are not stored", UserWarning, 2)
        meta = {
            "stage": "curvature",
            "kind": self.kind,
            "method": self.method,
            "solver": self.solver,
            "solve_damping": float(self.solve_damping),
            "options": opts,
            "tail": self.tail,
            "fitted_at": self.fitted_at,
            "fit_info": {k: v for k, v in self.fit_info.items() if _jsonable(v)},
            "horizon": self.horizon,
        }
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> Curvature:
        """A curvature stored by :meth:`save` (checksum verified; a foreign file is refused)."""
        tensors, meta = load_tensors(path)
        if meta.get("stage") != "curvature":
            raise ValueError(f"{path}: not a stored Curvature (stage {meta.get('stage')!r})")
        return cls(
            kind=meta["kind"],
            method=meta["method"],
            solver=meta["solver"],
            solve_damping=meta["solve_damping"],
            options=dict(meta.get("options", {})),
            eigvecs=tensors.get("eigvecs"),
            eigvals=tensors.get("eigvals"),
            tail=meta.get("tail"),
            fitted_at=meta.get("fitted_at"),
            fit_info=dict(meta.get("fit_info", {})),
            horizon=meta.get("horizon"),
        )


def _flow(a: Tensor, t: float) -> Tensor:
    """``φ_t(a) = (1 − e^{−ta}) / a`` elementwise, ``t`` where ``|ta|`` is tiny (``−expm1``
    keeps it accurate there)."""
    ta = t * a
    small = ta.abs() < 1e-8
    safe = torch.where(small, torch.ones_like(a), a)
    return torch.where(small, torch.full_like(a, t), -torch.expm1(-t * safe) / safe)


def _jsonable(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_jsonable(e) for e in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _jsonable(e) for k, e in v.items())
    return False


def _plain_or_digest(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return digest(v, strict=False) or f"<{type(v).__qualname__}>"


def point_digest(pt: BilevelPoint) -> str:
    """A digest of ``λ``, the tasks and their weights, and the chunking of ``pt``."""
    return str(digest({"lam": pt.lam, "tasks": pt.tasks_fingerprint(), "P": pt.lam.numel()}))


def as_curvature(
    curvature: str | Curvature,
    solver: str = "auto",
    solve_damping: float = 0.0,
    solver_kwargs: Mapping[str, Any] | None = None,
) -> Curvature:
    """The one validation of a solve's settings: a :class:`Curvature` as given (then ``solver``,
    ``solve_damping`` and ``solver_kwargs`` must keep their defaults: they live in it), or the
    unfitted curvature the strings stand for (``solver="auto"``, when no ``solver_kwargs`` are
    given: dense for ``P ≤ 1024``, else CG; resolved by :func:`resolve_auto` once ``P`` is
    known)."""
    if isinstance(curvature, Curvature):
        given = [
            name
            for name, v, d in (
                ("solver", solver, "auto"),
                ("solve_damping", solve_damping, 0.0),
                ("solver_kwargs", solver_kwargs, None),
            )
            if not (v is d or v == d)
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} given together with a Curvature object: they are part of "
                "it (pass them to mf.fit_curvature)"
            )
        return curvature
    if not isinstance(curvature, str):
        raise TypeError(
            f"curvature must be one of {CURVATURES} or a Curvature (mf.fit_curvature), got "
            f"{type(curvature).__name__}"
        )
    check_curvature(curvature)
    if solver_kwargs is not None and not isinstance(solver_kwargs, Mapping):
        raise TypeError(f"solver_kwargs must be a dict, got {type(solver_kwargs).__name__}")
    if solver == "auto" and solver_kwargs:  # arguments for the former default: CG's
        solver = "cg"
    if solver == "auto":
        return Curvature(curvature, "auto", "auto", solve_damping, {})
    return Curvature(curvature, "krylov", solver, solve_damping, dict(solver_kwargs or {}))


def resolve_auto(curv: Curvature, pt: BilevelPoint) -> Curvature:
    """The ``"auto"`` curvature at ``pt``: a dense fit when ``P ≤ AUTO_DENSE_MAX`` (``P`` HVP
    rows once; every solve then exact), plain CG above it. Any other curvature as is."""
    if curv.method != "auto":
        return curv
    if pt.lam.numel() <= AUTO_DENSE_MAX:
        opts = {k: v for k, v in curv.options.items() if k == "rtol"}
        return _fit(Curvature(curv.kind, "dense", "direct", curv.solve_damping, opts), pt)
    return Curvature(curv.kind, "krylov", "cg", curv.solve_damping, dict(curv.options))


def fit_curvature(
    problem: Any,
    meta_params: Any,
    train_tasks: Any,
    kind: str = "gauss_newton",
    method: str = "auto",
    solver: str = "cg",
    solve_damping: float = 0.0,
    rank: int = 32,
    power_iters: int = 1,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    task_weight: Tensor | None = None,
    pairs: tuple[Tensor, Tensor] | None = None,
    tail_probes: int = 4,
    horizon: float | None = None,
) -> Curvature:
    """Fit the curvature of ``(λ*, train_tasks)`` once; pass it to every solve of the job.

    Args:
        kind: ``"exact" | "gauss_newton" | "gamma"`` (math.md §2).
        method: ``"dense"`` (``P ≤ 8192``), ``"lowrank"``, ``"krylov"`` (nothing to fit) or
            ``"auto"`` (dense up to ``P = 1024``, else low-rank).
        solver: ``"cg"`` (the default: with a low-rank fit as its preconditioner), ``"approx"``
            (low-rank inverse used directly), or another total solver for ``"krylov"``.
        solve_damping: ``δ'``.
        rank, power_iters, seed: of the randomized low-rank fit (``seed`` also draws the
            secant fit's tail probes).
        options: the solver's keyword arguments (``rtol``, ``maxiter``, ...).
        pairs: ``(S [r, P], Y [r, P])`` for ``method="secant"``: the stationarity phase's
            secant pairs (``meta_train(..., info=info)`` leaves them in
            ``info["secant_pairs"]``; ``make_stationary``'s report holds them as ``.pairs``).
        tail_probes: HVP rows that estimate the secant fit's tail ``τ`` (0: none).
        horizon: ``t > 0``: every solve returns the training-horizon response ``φ_t(H + δ'I) b``
            instead of ``(H + δ'I)⁻¹ b`` (module docstring: the estimator for a ``λ*`` that is
            not stationary); None (default): the ordinary solve.

    Cost: dense ``P`` HVP rows; low-rank ``(power_iters + 2) · rank`` HVP rows in
    ``power_iters + 2`` batched passes; secant ``tail_probes`` rows (one pass); krylov none.
    ``fit_info`` records rows and seconds.
    """
    if method not in (*METHODS, "auto"):
        raise ValueError(f"method={method!r}: expected one of {(*METHODS, 'auto')}")
    pt = problem.point(meta_params, train_tasks, task_weight)
    P = pt.lam.numel()
    if method == "auto":
        method = "dense" if P <= AUTO_DENSE_MAX else "lowrank"
    if method == "dense" and solver in ("cg", "auto"):
        solver = "direct"
    if (method == "secant") != (pairs is not None):
        raise ValueError(
            "pairs=(S, Y) go with method='secant' (the stationarity phase's secant pairs: "
            "info['secant_pairs'] of mf.train.meta_train), and method='secant' needs them"
        )
    if method == "secant" and kind != "exact":
        raise ValueError(
            f"method='secant' measures the exact Hessian (differences of ∇F): use "
            f"kind='exact', not {kind!r}"
        )
    curv = Curvature(kind, method, solver, solve_damping, dict(options or {}), horizon=horizon)
    if method == "krylov":
        return curv
    if method == "secant":
        assert pairs is not None
        return _fit_secant(
            curv,
            pt,
            pairs,
            tail_probes=check_int(tail_probes, "tail_probes", minimum=0),
            seed=check_int(seed, "seed", minimum=0),
        )
    return _fit(
        curv,
        pt,
        rank=check_int(rank, "rank", minimum=1),
        power_iters=check_int(power_iters, "power_iters", minimum=0),
        seed=check_int(seed, "seed", minimum=0),
    )


def _hvp_rows(pt: BilevelPoint, kind: str, X: Tensor, chunk: int = 256) -> Tensor:
    """``H X`` for rows ``X [k, P]`` in batches of ``chunk`` rows."""
    parts = [pt.hvp(X[i : i + chunk], kind).detach() for i in range(0, X.shape[0], chunk)]
    return torch.cat(parts) if parts else X.clone()


def _fit(
    curv: Curvature, pt: BilevelPoint, rank: int = 32, power_iters: int = 1, seed: int = 0
) -> Curvature:
    t0 = time.perf_counter()
    P, dt, dev = pt.lam.numel(), pt.lam.dtype, pt.lam.device
    if curv.method == "dense":
        if P > DENSE_MAX:
            raise ValueError(
                f"method='dense': P={P} exceeds {DENSE_MAX} (a P×P factorisation); use "
                "method='lowrank' or 'krylov'"
            )
        H = _hvp_rows(pt, curv.kind, torch.eye(P, dtype=dt, device=dev))  # row j = (H e_j)ᵀ
        lam, Q = torch.linalg.eigh(0.5 * (H + H.T))
        out = dataclasses.replace(curv, eigvecs=Q, eigvals=lam, tail=None)
        rows = P
    else:
        r = min(rank, P)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        Y = _hvp_rows(pt, curv.kind, torch.randn(r, P, generator=gen, dtype=dt).to(dev))
        for _ in range(power_iters):
            Y = _hvp_rows(pt, curv.kind, torch.linalg.qr(Y.T).Q.T.contiguous())
        Q = torch.linalg.qr(Y.T).Q  # [P, r] orthonormal basis of the range of H Ω
        HQ = _hvp_rows(pt, curv.kind, Q.T.contiguous())  # [r, P] = (H Q)ᵀ
        T = Q.T @ HQ.T
        lam, V = torch.linalg.eigh(0.5 * (T + T.T))
        order = torch.argsort(lam.abs(), descending=True)
        lam, U = lam[order], Q @ V[:, order]
        tail = float(lam.abs().min()) if lam.numel() else 1.0
        out = dataclasses.replace(curv, eigvecs=U, eigvals=lam, tail=tail)
        rows = r * (power_iters + 2)
    out.fitted_at = point_digest(pt)
    out.fit_info = {"P": P, "hvp_rows": rows, "seconds": time.perf_counter() - t0}
    return out


def secant_eigenpairs(S: Tensor, Y: Tensor, rcond: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Ritz pairs ``(Λ [r'], U [P, r'])`` of ``H`` on ``span(S)`` from secant pairs.

    With ``Sᵀ = W Σ Vᵀ`` (thin SVD, singular values below ``rcond · σ_max`` dropped: dependent
    steps), ``H W ≈ Yᵀ V Σ⁻¹`` because ``Yᵀ ≈ H Sᵀ``; the Rayleigh-Ritz matrix
    ``T = Wᵀ Yᵀ V Σ⁻¹`` (symmetrised) ``= Z Λ Zᵀ`` gives ``U = W Z``, ordered by ``|Λ|``
    descending. ``S``, ``Y``: ``[r, P]``, row ``j`` the step ``s_j`` and the gradient change
    ``y_j``.
    """
    if S.dim() != 2 or S.shape != Y.shape:
        raise ValueError(
            f"pairs must be two [r, P] tensors of one shape, got {tuple(S.shape)} and "
            f"{tuple(Y.shape)}"
        )
    if S.shape[0] == 0:
        raise ValueError("pairs are empty: the stationarity phase kept no secant pair")
    W, sig, Vh = torch.linalg.svd(S.T, full_matrices=False)  # S.T = W diag(sig) Vh
    keep = sig > rcond * sig.max()
    W, sig, Vh = W[:, keep], sig[keep], Vh[keep]
    HW = (Y.T @ Vh.T) / sig  # [P, r'] ≈ H W
    T = W.T @ HW
    lam, Z = torch.linalg.eigh(0.5 * (T + T.T))
    order = torch.argsort(lam.abs(), descending=True)
    return lam[order], W @ Z[:, order]


def _fit_secant(
    curv: Curvature, pt: BilevelPoint, pairs: tuple[Tensor, Tensor], tail_probes: int, seed: int
) -> Curvature:
    """The secant fit (module docstring): Ritz pairs from the pairs, and the tail ``τ`` as the
    mean Rayleigh quotient of ``tail_probes`` random directions projected out of ``span(U)``
    (the best constant for ``H`` on the complement in the Frobenius sense), else the smallest
    ``|Ritz value|``."""
    t0 = time.perf_counter()
    P, dt, dev = pt.lam.numel(), pt.lam.dtype, pt.lam.device
    S, Y = (t.detach().to(dev, torch.float64) for t in pairs)
    if S.dim() != 2 or S.shape[1] != P:
        raise ValueError(f"pairs have shape {tuple(S.shape)}; expected [r, P={P}]")
    lam, U = secant_eigenpairs(S, Y)
    lam, U = lam.to(dt), U.to(dt)
    tail = float(lam.abs().min())
    if tail_probes:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        Z = torch.randn(tail_probes, P, generator=gen, dtype=dt).to(dev)
        Z = Z - (Z @ U) @ U.T
        Z = Z / torch.linalg.vector_norm(Z, dim=1, keepdim=True)
        quotients = (_hvp_rows(pt, curv.kind, Z) * Z).sum(1)
        tail = float(quotients.mean())
        if not tail > 0:  # an indefinite complement: fall back to the smallest Ritz value
            tail = float(lam.abs().min())
    out = dataclasses.replace(curv, eigvecs=U, eigvals=lam, tail=tail)
    out.fitted_at = point_digest(pt)
    out.fit_info = {
        "P": P,
        "hvp_rows": tail_probes,
        "pairs": int(S.shape[0]),
        "rank": int(lam.numel()),
        "seconds": time.perf_counter() - t0,
    }
    return out
