"""Resumable removal effects: SIGKILL mid-run, rerun, identical result, finished chunks (and the
solve) not recomputed; a streamed rerun does not even build the finished chunks' engines; a
damaged file is reported and recomputed; a changed configuration is refused.

The worker's CG solve makes exact products, so its scores are read off them (the tape) unless
``tape=False`` (every chunk by a mixed product: the path of solves without such products, where
chunks take time and a kill can fall between them)."""

from __future__ import annotations

import signal
import warnings

import pytest
import torch

import metafluence as mf
import metafluence.bilevel.point as point_module
from tests import resume_worker as w
from tests._close import assert_close_normwise

CHUNKS = [0, 2, 4, 6]  # 8 tasks in chunks of 2: logged by their first task


def assert_same(a: mf.InfluenceResult, b: mf.InfluenceResult) -> None:
    assert torch.equal(a.scores, b.scores)
    for kind in ("support_point", "query_point"):
        for x, y in zip(a.all_scores[kind], b.all_scores[kind], strict=True):
            assert torch.equal(x, y)
    assert torch.equal(a.solve.x, b.solve.x) and torch.equal(a.solve.residual, b.solve.residual)
    assert (a.solve.iters, a.solve.converged) == (b.solve.iters, b.solve.converged)
    assert torch.equal(a.target_grad, b.target_grad)
    assert a.meta_grad_norm == b.meta_grad_norm
    assert a.diagnostics == b.diagnostics and a.task_ids == b.task_ids


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted, without a progress directory."""
    return quiet(w.scores, tmp_path_factory.mktemp("ref"), store=False)


@pytest.fixture(scope="module")
def reference_products(tmp_path_factory, reference):
    """Uninterrupted, every chunk by a mixed product (``tape=False``): the tape's scores to
    rounding."""
    out = quiet(w.scores, tmp_path_factory.mktemp("ref-products"), store=False, tape=False)
    assert torch.equal(out.solve.x, reference.solve.x)
    assert_close_normwise(out.scores, reference.scores, rtol=1e-5)
    for kind in ("support_point", "query_point"):
        a, b = (torch.stack(r.all_scores[kind]) for r in (out, reference))
        assert_close_normwise(a, b, rtol=1e-5)
    return out


def test_kill_and_resume_removal_effects(tmp_path, reference_products):
    reference = reference_products
    store_dir = tmp_path / "scores"

    def some_chunk_done():
        return store_dir.is_dir() and any(store_dir.glob("scores-*.safetensors"))

    rc = w.run_and_kill("scores-products", tmp_path, some_chunk_done, sleep=0.4)
    assert rc == -signal.SIGKILL
    assert (store_dir / "solve.safetensors").exists()
    finished = {int(p.name.split("-")[1]) for p in store_dir.glob("scores-*.safetensors")}
    assert finished and len(finished) < len(CHUNKS)  # killed mid-way through the scores
    assert not (store_dir / "diagnostics.safetensors").exists()
    (tmp_path / "work.log").unlink()
    resumed = quiet(w.scores, tmp_path, tape=False)
    # neither the solve nor a finished chunk was recomputed
    assert w.work_log(tmp_path) == [f"chunk {k}" for k in CHUNKS if k not in finished]
    assert_same(resumed, reference)
    assert (reference.scores != 0).all()
    (tmp_path / "work.log").unlink()
    again = quiet(w.scores, tmp_path, items="query_point", tape=False)  # nothing redone
    assert w.work_log(tmp_path) == [] and again.items == "query_point"
    for x, y in zip(again.scores, reference.all_scores["query_point"], strict=True):
        assert torch.equal(x, y)


def test_streamed_rerun_builds_only_unfinished_engines(tmp_path, reference_products, monkeypatch):
    reference = reference_products
    first = quiet(w.scores, tmp_path, streamed=True, tape=False)
    assert_same(first, reference)  # streamed = stacked, bit for bit
    for k in (2, 6):  # as if killed before these chunks were saved
        (tmp_path / "scores" / f"scores-{k:08d}-{k + 2:08d}.safetensors").unlink()
    built = []
    engine = point_module.build_engine

    def counting(fm, inner, batch, lam):
        built.append(list(batch.ids))
        return engine(fm, inner, batch, lam)

    monkeypatch.setattr(point_module, "build_engine", counting)
    (tmp_path / "work.log").unlink()
    resumed = quiet(w.scores, tmp_path, streamed=True, tape=False)
    assert built == [[2, 3], [6, 7]]  # solve and diagnostics loaded, finished chunks skipped
    assert w.work_log(tmp_path) == ["chunk 2", "chunk 6"]
    assert_same(resumed, reference)


def test_damaged_files_are_reported_and_recomputed(tmp_path, reference_products):
    reference = reference_products
    quiet(w.scores, tmp_path, tape=False)
    d = tmp_path / "scores"
    chunk = d / "scores-00000004-00000006.safetensors"
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 0x01
    chunk.write_bytes(bytes(blob))
    (tmp_path / "work.log").unlink()
    with pytest.warns(RuntimeWarning, match=r"scores-00000004-00000006.*corrupt.*not used"):
        again = w.scores(tmp_path, tape=False)
    assert w.work_log(tmp_path) == ["chunk 4"]
    assert_same(again, reference)
    assert chunk.with_name(chunk.name + ".corrupt").exists()
    # a truncated solve: reported, solved again; the chunks match the new s and are kept
    solve = d / "solve.safetensors"
    solve.write_bytes(solve.read_bytes()[:100])
    (tmp_path / "work.log").unlink()
    with pytest.warns(RuntimeWarning, match=r"solve\.safetensors.*corrupt.*truncated"):
        again = w.scores(tmp_path, tape=False)
    assert w.work_log(tmp_path) == ["solve"]
    assert_same(again, reference)


def test_tape_solve_is_saved_after_its_chunks_and_made_again_for_a_lost_chunk(tmp_path, reference):
    first = quiet(w.scores, tmp_path)
    assert w.work_log(tmp_path) == ["solve"]  # every chunk read off the solve's products
    assert_same(first, reference)
    streamed = quiet(w.scores, tmp_path / "streamed", streamed=True)
    assert_same(streamed, reference)  # streamed = stacked, bit for bit, on the tape too
    d = tmp_path / "scores"
    # killed between the chunks and the solve (saved last): solved again, chunks loaded
    (d / "solve.safetensors").unlink()
    (tmp_path / "work.log").unlink()
    assert_same(quiet(w.scores, tmp_path), reference)
    assert w.work_log(tmp_path) == ["solve"]
    # chunks of a stored tape solve lost: its products made again, once; the same bits
    for k in (2, 6):
        (d / f"scores-{k:08d}-{k + 2:08d}.safetensors").unlink()
    (tmp_path / "work.log").unlink()
    assert_same(quiet(w.scores, tmp_path), reference)
    assert w.work_log(tmp_path) == ["solve"]
    (tmp_path / "work.log").unlink()
    assert_same(quiet(w.scores, tmp_path), reference)
    assert w.work_log(tmp_path) == []  # all stored now


def test_chunks_of_another_solve_are_not_used(tmp_path, reference_products):
    reference = reference_products
    quiet(w.scores, tmp_path, tape=False)
    from metafluence._store import load_tensors, save_tensors

    # a solve file with a different s (as if a rerun had solved to another precision)
    path = tmp_path / "scores" / "solve.safetensors"
    tensors, meta = load_tensors(path)
    tensors["x"] = tensors["x"] * 2
    save_tensors(path, tensors, meta)
    (tmp_path / "work.log").unlink()
    doubled = quiet(w.scores, tmp_path, tape=False)
    assert w.work_log(tmp_path) == [f"chunk {k}" for k in CHUNKS]  # all recomputed with 2 s
    assert doubled.diagnostics["solve_converged"] == reference.diagnostics["solve_converged"]
    assert_close_normwise(doubled.scores, 2 * reference.scores, rtol=1e-6)


@pytest.mark.parametrize("streamed", [False, True])
def test_chunk_copied_over_another_is_refused_and_recomputed(
    tmp_path, reference_products, streamed
):
    reference = reference_products
    quiet(w.scores, tmp_path, streamed=streamed, tape=False)
    d = tmp_path / "scores"
    a, b = (d / f"scores-{k:08d}-{k + 2:08d}.safetensors" for k in (0, 4))
    b.write_bytes(a.read_bytes())  # a valid checksum, but chunk 0-2's scores
    (tmp_path / "work.log").unlink()
    with pytest.warns(RuntimeWarning, match=r"scores-00000004-00000006.*another computation.*key"):
        again = w.scores(tmp_path, streamed=streamed, tape=False)
    assert w.work_log(tmp_path) == ["chunk 4"]  # only the refused chunk was recomputed
    assert_same(again, reference)
    (tmp_path / "work.log").unlink()
    assert_same(quiet(w.scores, tmp_path, streamed=streamed, tape=False), reference)
    assert w.work_log(tmp_path) == []  # the recomputed chunk is stored under its own identity


@pytest.mark.parametrize("stage", ["solve", "diagnostics"])
def test_stage_from_a_store_with_another_solve_damping_is_refused(tmp_path, reference, stage):
    quiet(w.scores, tmp_path / "other", solve_damping=0.5)
    quiet(w.scores, tmp_path)
    name = f"{stage}.safetensors"
    (tmp_path / "scores" / name).write_bytes((tmp_path / "other" / "scores" / name).read_bytes())
    (tmp_path / "work.log").unlink()
    with pytest.warns(RuntimeWarning, match=rf"{name}.*another computation \(store: "):
        again = w.scores(tmp_path)
    assert w.work_log(tmp_path) == (["solve"] if stage == "solve" else [])
    assert_same(again, reference)


def test_streamed_tasks_changed_after_the_first_chunk_are_refused(tmp_path):
    """A streamed dataset whose later tasks changed: the store's fingerprint digests every
    chunk (not only the first), so neither the stored solve nor any chunk is used."""
    quiet(w.scores, tmp_path, streamed=True)
    changed = w.tasks(8, 0)
    t = changed[5]
    changed[5] = mf.Task(support=(t.support[0] + 1, t.support[1]), query=t.query, id=t.id)
    _, prob = w.problem(chunk_size=2)
    with pytest.raises(ValueError, match=r"differing keys: train_tasks\.chunks"):
        mf.removal_effects(
            prob,
            prob.init_params(),
            w.Dataset(changed),
            w.tasks(3, 1),
            solve_damping=0.3,
            solver_kwargs={"maxiter": 30},
            lanczos_steps=5,
            checkpoint_dir=tmp_path / "scores",
        )


def test_changed_configuration_is_refused(tmp_path):
    quiet(w.scores, tmp_path)
    with pytest.raises(ValueError, match="differing keys: solve_damping"):
        w.scores(tmp_path, solve_damping=0.2)
    with pytest.raises(ValueError, match="differing keys: curvature, solver"):
        w.scores(tmp_path, curvature="gauss_newton", solver="direct")
    _, prob = w.problem(chunk_size=2)
    with pytest.raises(ValueError, match=r"differing keys: target\.tasks"):
        mf.removal_effects(
            prob,
            prob.init_params(),
            w.tasks(8, 0),
            w.tasks(2, 1),
            solve_damping=0.3,
            solver_kwargs={"maxiter": 30},
            lanczos_steps=5,
            checkpoint_dir=tmp_path / "scores",
        )


def test_callable_target_is_fingerprinted_by_its_gradient(tmp_path, reference):
    def target(params):
        return sum((v**2).sum() for v in params.values())

    def other(params):
        return sum(v.sum() for v in params.values())

    first = quiet(w.scores, tmp_path, target=target)
    (tmp_path / "work.log").unlink()
    again = quiet(w.scores, tmp_path, target=target)
    assert w.work_log(tmp_path) == []  # solve and every chunk loaded
    assert_same(again, first)
    assert not torch.equal(first.scores, reference.scores)
    with pytest.raises(ValueError, match=r"differing keys: target\.callable, target\.grad"):
        w.scores(tmp_path, target=other)


def test_ranks_keep_own_directories_and_load_only_together(tmp_path):
    """Under torch.distributed (stubbed: world 2): per-rank subdirectories, and a stage with
    collectives is loaded only when every rank has it (else all recompute, in lock step)."""
    from types import SimpleNamespace

    from metafluence.influence import _checkpoint as ck

    def point(rank, other_has):
        reduce = SimpleNamespace(world=2, rank=rank, sum=lambda t: t + float(other_has))
        return SimpleNamespace(reduce=reduce, lam=torch.zeros(3))

    store = ck.open_store(tmp_path, point(1, True), {"x": 1})
    assert store.directory == tmp_path / "rank1-of-2"
    assert ck.everywhere(point(0, True), True)
    assert not ck.everywhere(point(0, False), True)
    assert not ck.everywhere(point(0, True), False)
