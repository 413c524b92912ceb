"""The embedded default: an Omniglot-like glyph dataset rendered from KanjiVG stroke data.

KanjiVG (https://kanjivg.tagaini.net, © Ulrich Apel, CC BY-SA 3.0; PyPI ``kanjivg``) draws each
kanji as one SVG ``<path>`` per stroke (cubic Béziers), in stroke order, grouped by components
with the radical marked. Here each kanji with few strokes is a class; its radical group plays
the role of an Omniglot alphabet, and the train/val/test split is by radical group. Every
sample is a new "drawing": a random affine map, per-stroke offsets, noise on the Bézier control
points and a random pen width, rasterised at 3× supersampling and box-filtered to 28×28
(ink = 255).

The rasteriser is vectorised: all samples of a class are drawn at once (Bernstein-basis curve
sampling, a scatter into the supersampled grid, a disk dilation by convolution, average
pooling). The result is exactly reproducible for a seed (every intermediate is binary or a
multiple of 1/9) and cached as an ``.npz`` under ``$METAFLUENCE_CACHE`` (default
``~/.cache/metafluence``), written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import check_int
from .dataset import FewShotDataset, cache_root, class_split, group_split

VIEW = 109.0  # KanjiVG viewBox size
GLYPHS_VERSION = 1
MIN_SIZE = 4  # the widest pen disk (9 supersampled px) must fit the 3x grid
LICENCE = "KanjiVG (c) Ulrich Apel, CC BY-SA 3.0, https://kanjivg.tagaini.net"


def kanjivg_dir() -> Path:
    """The installed ``kanji/`` folder of the ``kanjivg`` wheel."""
    from importlib import metadata

    try:
        dist = metadata.distribution("kanjivg")
    except metadata.PackageNotFoundError:
        raise ImportError(
            "the glyphs dataset needs KanjiVG stroke data: pip install kanjivg"
        ) from None
    path = Path(str(dist.locate_file("kanji/04e00.svg"))).parent
    if not path.is_dir():
        raise ImportError(f"kanjivg is installed but {path} is missing; reinstall kanjivg")
    return path


# ---- SVG path parsing -----------------------------------------------------------------------

_TOKEN = re.compile(r"[MmCcSsLlHhVvZz]|-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_PATH = re.compile(r'<path[^>]*\sd="([^"]+)"')
_RADICAL = re.compile(r'kvg:element="([^"]+)"[^>]*kvg:radical="general"')


def parse_path(d: str) -> np.ndarray:
    """SVG path data → cubic Bézier segments ``[k, 4, 2]`` (lines become straight cubics)."""
    toks = _TOKEN.findall(d)
    segs: list[list[tuple[float, float]]] = []
    cur = np.zeros(2)
    start = np.zeros(2)
    last_ctrl: np.ndarray | None = None
    i, cmd = 0, ""
    while i < len(toks):
        if toks[i].isalpha():
            cmd = toks[i]
            i += 1
            if cmd in "Zz":
                if not np.allclose(cur, start):
                    segs.append([tuple(cur), tuple(cur), tuple(start), tuple(start)])
                cur, last_ctrl = start.copy(), None
                continue
        rel = cmd.islower()
        base = cur if rel else np.zeros(2)
        c = cmd.upper()
        n = {"M": 2, "C": 6, "S": 4, "L": 2, "H": 1, "V": 1}[c]
        vals = [float(t) for t in toks[i : i + n]]
        i += n
        if len(vals) < n:
            break
        if c == "M":
            cur = base + vals
            start = cur.copy()
            last_ctrl = None
            cmd = "l" if rel else "L"  # implicit lineto after moveto
        elif c == "C":
            p1, p2, p3 = base + vals[0:2], base + vals[2:4], base + vals[4:6]
            segs.append([tuple(cur), tuple(p1), tuple(p2), tuple(p3)])
            cur, last_ctrl = p3, p2
        elif c == "S":
            p1 = 2 * cur - last_ctrl if last_ctrl is not None else cur.copy()
            p2, p3 = base + vals[0:2], base + vals[2:4]
            segs.append([tuple(cur), tuple(p1), tuple(p2), tuple(p3)])
            cur, last_ctrl = p3, p2
        else:
            if c == "L":
                p3 = base + vals
            elif c == "H":
                p3 = np.array([(cur[0] if rel else 0.0) + vals[0], cur[1]])
            else:
                p3 = np.array([cur[0], (cur[1] if rel else 0.0) + vals[0]])
            segs.append(
                [
                    tuple(cur),
                    tuple(cur + (p3 - cur) / 3),
                    tuple(cur + 2 * (p3 - cur) / 3),
                    tuple(p3),
                ]
            )
            cur, last_ctrl = p3, None
    return np.asarray(segs, dtype=np.float64).reshape(-1, 4, 2)


@dataclass
class Glyph:
    """One KanjiVG character: ``strokes`` is a list of ``[k, 4, 2]`` Bézier arrays."""

    code: str
    char: str
    radical: str
    strokes: list[np.ndarray]


def scan_kanjivg(max_strokes: int = 10, min_strokes: int = 2) -> list[tuple[str, str, int]]:
    """``(code, radical, n_strokes)`` of every base CJK kanji with a marked radical."""
    return list(_scan_kanjivg(str(kanjivg_dir()), int(max_strokes), int(min_strokes)))


@functools.lru_cache(maxsize=8)
def _scan_kanjivg(
    folder: str, max_strokes: int, min_strokes: int
) -> tuple[tuple[str, str, int], ...]:
    root = Path(folder)
    out = []
    for f in sorted(root.glob("0[4-9]*.svg")):
        code = f.stem
        if "-" in code or not 0x4E00 <= int(code, 16) <= 0x9FFF:
            continue
        text = f.read_text(encoding="utf-8")
        n = len(_PATH.findall(text))
        if not min_strokes <= n <= max_strokes:
            continue
        m = _RADICAL.search(text)
        if m is None:
            continue
        out.append((code, m.group(1), n))
    return tuple(out)


def read_glyph(code: str) -> Glyph:
    text = (kanjivg_dir() / f"{code}.svg").read_text(encoding="utf-8")
    m = _RADICAL.search(text)
    strokes = [parse_path(d) for d in _PATH.findall(text)]
    return Glyph(code, chr(int(code, 16)), m.group(1) if m else "?", [s for s in strokes if len(s)])


def select_classes(num_classes: int, max_strokes: int, seed: int) -> list[tuple[str, str]]:
    """Seeded choice of ``(code, radical)``: whole radical groups (capped in size) until full."""
    entries = scan_kanjivg(max_strokes=max_strokes)
    groups: dict[str, list[str]] = {}
    for code, rad, _ in entries:
        groups.setdefault(rad, []).append(code)
    cap = int(np.clip(num_classes // 8, 2, 40))
    names = sorted(g for g, v in groups.items() if len(v) >= 2)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[str, str]] = []
    for k in rng.permutation(len(names)):
        g = names[int(k)]
        members = sorted(groups[g])
        take = rng.choice(len(members), size=min(cap, len(members)), replace=False)
        for j in sorted(take.tolist()):
            if len(chosen) < num_classes:
                chosen.append((members[j], g))
        if len(chosen) >= num_classes:
            break
    if len(chosen) < num_classes:
        raise ValueError(
            f"glyphs: only {len(chosen)} kanji with ≤ {max_strokes} strokes; "
            f"ask for fewer classes or raise max_strokes"
        )
    return chosen


# ---- rendering ------------------------------------------------------------------------------


def _disk(radius: float) -> torch.Tensor:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return torch.from_numpy((xx**2 + yy**2 <= radius**2 + 1e-9).astype(np.float32))


def render_glyph(
    glyph: Glyph,
    samples: int,
    rng: np.random.Generator,
    size: int = 28,
    supersample: int = 3,
    jitter: float = 1.0,
) -> np.ndarray:
    """``samples`` jittered renditions of one glyph → uint8 ``[samples, size, size]`` (ink 255)."""
    grid = size * supersample
    pts_list, seg_stroke = [], []
    for s, st in enumerate(glyph.strokes):
        pts_list.append(st)
        seg_stroke += [s] * len(st)
    ctrl = np.concatenate(pts_list)  # [K, 4, 2]
    seg_stroke_a = np.asarray(seg_stroke)
    K, n_str, B = len(ctrl), len(glyph.strokes), int(samples)
    # control-point noise, shared at the joint of consecutive segments of a stroke
    noise = rng.normal(0.0, 1.2 * jitter, size=(B, K, 4, 2))
    same = np.r_[False, seg_stroke_a[1:] == seg_stroke_a[:-1]]
    noise[:, same, 0] = np.roll(noise[:, :, 3], 1, axis=1)[:, same]
    offs = rng.normal(0.0, 1.8 * jitter, size=(B, n_str, 2))[:, seg_stroke_a][:, :, None, :]
    ang = rng.normal(0.0, 0.08 * jitter, size=B)
    scale = np.exp(rng.normal(0.0, 0.06 * jitter, size=(B, 2))) * 0.92
    shear = rng.normal(0.0, 0.10 * jitter, size=B)
    shift = rng.normal(0.0, 2.5 * jitter, size=(B, 2))
    width = rng.uniform(0.75, 1.35, size=B)  # pen radius in output pixels
    cos, sin = np.cos(ang), np.sin(ang)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [B, 2, 2]
    shr = np.zeros((B, 2, 2))
    shr[:, 0, 0] = shr[:, 1, 1] = 1.0
    shr[:, 0, 1] = shear
    A = rot @ shr * scale[:, None, :]  # [B, 2, 2]
    c = VIEW / 2
    P = ctrl[None] + noise + offs - c  # [B, K, 4, 2]
    P = np.einsum("bij,bkpj->bkpi", A, P) + c + shift[:, None, None, :]
    P = P * (grid / VIEW)
    # per-segment sample counts from the control-polygon length (spacing ≤ 0.5 px)
    poly = np.linalg.norm(np.diff(P, axis=2), axis=-1).sum(-1).max(0)  # [K]
    counts = np.maximum(2, np.ceil(poly / 0.5).astype(np.int64) + 1)
    seg_of = np.repeat(np.arange(K), counts)
    t = np.concatenate([np.linspace(0.0, 1.0, int(n)) for n in counts])
    basis = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3], -1)  # [L, 4]
    curve = np.einsum("lp,blpd->bld", basis, P[:, seg_of])  # [B, L, 2]
    ij = np.rint(curve).astype(np.int64)
    ok = (ij >= 0).all(-1) & (ij < grid).all(-1)
    b_idx = np.broadcast_to(np.arange(B)[:, None], ok.shape)[ok]
    flat = b_idx * grid * grid + ij[..., 1][ok] * grid + ij[..., 0][ok]
    canvas = np.zeros(B * grid * grid, dtype=np.float32)
    canvas[flat] = 1.0
    canvas_t = torch.from_numpy(canvas.reshape(B, 1, grid, grid))
    out = torch.zeros(B, 1, size, size)
    radii = np.round(width * supersample * 2) / 2  # quantised to 0.5 px (few kernels)
    for r in np.unique(radii):
        sel = torch.from_numpy(np.flatnonzero(radii == r))
        k = _disk(float(r))[None, None]
        ink = torch.nn.functional.conv2d(canvas_t[sel], k, padding=k.shape[-1] // 2)
        out[sel] = torch.nn.functional.avg_pool2d(ink.clamp_(max=1.0), supersample)
    return np.rint(out[:, 0].numpy() * 255.0).astype(np.uint8)


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` atomically: a temporary file in the same folder, flushed and
    fsynced, then renamed over ``path``. A crash leaves either no file or the complete one
    (every member of the zip carries a CRC-32, checked on read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_glyphs(
    num_classes: int = 400,
    samples: int = 20,
    size: int = 28,
    max_strokes: int = 10,
    seed: int = 0,
    cache: bool = True,
    progress: bool = False,
) -> FewShotDataset:
    """The embedded default dataset (KanjiVG glyphs), built once and cached.

    ``num_classes`` kanji (≤ ``max_strokes`` strokes) × ``samples`` renditions at
    ``size``×``size``; split by radical group ≈ 60/20/20 of the classes. Deterministic by seed.
    """
    num_classes = check_int(num_classes, "glyphs: num_classes", minimum=3)
    samples = check_int(samples, "glyphs: samples", minimum=1)
    size = check_int(size, "glyphs: size", minimum=MIN_SIZE)
    max_strokes = check_int(max_strokes, "glyphs: max_strokes", minimum=2)
    seed = check_int(seed, "glyphs: seed", minimum=0)
    key = dict(
        v=GLYPHS_VERSION,
        classes=int(num_classes),
        samples=int(samples),
        size=int(size),
        max_strokes=int(max_strokes),
        seed=int(seed),
    )
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"glyphs-{num_classes}x{samples}-{size}px-s{seed}-{tag}.npz"
    if cache and path.is_file():
        cached = _read_cache(path, key)
        if cached is not None:
            return _dataset(*cached, key, path)
    chosen = select_classes(int(num_classes), int(max_strokes), int(seed))
    images = np.zeros((len(chosen), int(samples), int(size), int(size)), dtype=np.uint8)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), desc="render glyphs", leave=False)
    for i, (code, _) in enumerate(chosen):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(code, 16)]))
        images[i] = render_glyph(read_glyph(code), int(samples), rng, size=int(size))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    codes = [c for c, _ in chosen]
    radicals = [r for _, r in chosen]
    if cache:
        _atomic_save_npz(path, images=images, codes=np.array(codes), radicals=np.array(radicals))
    return _dataset(images, codes, radicals, key, path if cache else None)


def _read_cache(path: Path, key: dict) -> tuple[np.ndarray, list, list] | None:
    """``(images, codes, radicals)`` from a cache file, or ``None`` (with a warning naming the
    file) when it is truncated, corrupt (zip CRC) or does not hold what ``key`` describes; the
    caller then rebuilds it."""
    want = (key["classes"], key["samples"], key["size"], key["size"])
    try:
        with np.load(path, allow_pickle=False) as z:
            images = np.asarray(z["images"])  # reads (and CRC-checks) every member
            codes, radicals = list(z["codes"]), list(z["radicals"])
        problem = None
        if images.dtype != np.uint8 or images.shape != want:
            problem = f"images {images.dtype} {list(images.shape)}, expected uint8 {list(want)}"
        elif len(codes) != want[0] or len(radicals) != want[0]:
            problem = f"{len(codes)} codes / {len(radicals)} radicals for {want[0]} classes"
        elif not all(re.fullmatch(r"[0-9a-f]{5}", str(c)) for c in codes):
            problem = "malformed kanji codes"
    except Exception as e:  # BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError
        problem = " ".join(f"{type(e).__name__}: {e}".split())
    if problem is None:
        return images, codes, radicals
    import warnings

    warnings.warn(
        f"glyphs: damaged cache file {path} ({problem}); rebuilding it",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _dataset(images: np.ndarray, codes: list, radicals: list, key: dict, path: Path | None):
    C, n = images.shape[:2]
    labels = np.repeat(np.arange(C), n)
    codes = [str(c) for c in codes]
    radicals = [str(r) for r in radicals]
    sc = group_split(radicals, int(key["seed"]))
    names = [f"{chr(int(c, 16))} U+{c.upper()}" for c in codes]
    meta = {
        "source": LICENCE,
        "groups": radicals,
        "config": key,
        "cache": str(path) if path else None,
    }
    return FewShotDataset(
        "glyphs",
        images.reshape(C * n, *images.shape[2:]),
        labels,
        names,
        class_split(labels, sc),
        meta=meta,
    )
