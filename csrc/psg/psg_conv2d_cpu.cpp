// CPU implementation of metafluence::psg_conv2d, psg_conv2d_sqnorm and psg_conv2d_dot (one op
// family: one kernel, three epilogues). Formulas (per sample n, group gi; x zero-padded):
//   G_n[o, c, i, j] = sum_{y, x} grad_outputs[n, o, y, x]
//                     * x[n, c, y sh + i dh - ph, x sw + j dw - pw]
//   psg_conv2d:        out[n] = G_n                       [N, O, C / groups, kh, kw]
//   psg_conv2d_sqnorm: out[n] = ||G_n||_F^2               [N]
//   psg_conv2d_dot:    out[n, j] = <G_n, vectors[j]>_F    [N, m]
// Implicit GEMM: G_n (per group) is [Og, Kg] = g_n [Og, T] x U_n^T, U_n [Kg, T] the unfolded
// input, which is never formed. One work item = (sample, group, block of OB output channels).
// Its grad_outputs are packed once, transposed, [T, OB]; a register tile of MR kernel entries
// k = (c, i, j) x OB output channels accumulates over all T output positions, reading the
// (zero-padded copy of the) input directly at x[c, y sh + i dh, x sw + j dw]: one broadcast per
// kernel entry and NV vector loads per position. The tile then goes to its epilogue: stored
// (psg_conv2d), squared and summed, or dotted with the matching tile of each vector -- G is
// never written for the reductions. Reductions keep per-lane partial sums over 16 tiles, then
// a double sum per work item, summed over items in a fixed order (deterministic).
// Small kernels over many output positions (Kg = C/groups kh kw <= kTMaxK and T >= 8 Kg + 64,
// the measured crossover; e.g. first layers: Kg = 9 at C = 1, 3x3) take the transposed form
// ("t-form"): the register tile is kTO output channels x kTK kernel entries, each a vector over
// output positions t. grad_outputs rows [T] are then read in place
// (no packing: at Kg = 9 packing them cost more than the multiply-adds) and U is unfolded
// kChunk positions at a time into a per-thread buffer [Kg, kChunk] (the whole of U is never
// formed). One work item there = (sample, group, block of up to kTOB output channels).
// An AVX2+FMA build of the kernels is chosen at run time where the CPU has it; otherwise a
// portable build of the same code runs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "psg/psg_conv2d_check.h"

namespace metafluence {
namespace {

#define MF_INLINE inline __attribute__((always_inline))

template <typename S>
struct Vec;  // 32-byte vectors (GCC vector extensions)
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

// Unaligned vector load / store (memcpy: no aliasing or alignment assumptions; one vmovups).
template <typename V, typename S>
MF_INLINE V loadu(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename S>
MF_INLINE void storeu(S* p, const V v) {
  std::memcpy(p, &v, sizeof(V));
}

constexpr int kMR = 6;  // kernel entries per register tile
constexpr int kNV = 2;  // vectors of output channels per register tile

enum class Epilogue { kStore, kSqnorm, kDot };

template <typename S>
struct Args {
  Conv2dGeom g;
  const S* act;     // [N, C, H, W] contiguous
  const S* gout;    // [N, O, Ho, Wo] contiguous
  S* out;           // kStore: [N, O, Cg, kh, kw]
  const S* vt;      // kDot: vectors packed [m, groups, nob, Kg, OB] (zero-padded channels);
                    // t-form: vectors as given, [m, O, Kg] contiguous
  double* partial;  // kSqnorm: [items]; kDot: [items, m]
  int64_t m;
  bool tform;   // the transposed form (small Kg), see the top of the file
  int64_t ob;   // output channels per work item (c-form: kNV lanes; t-form: up to kTOB)
  int64_t nob;  // output-channel blocks per group
  int64_t Hp, Wp;
  bool pad;             // input copied with zero padding (else read in place)
  const int64_t* koff;  // [Kg]: offset of kernel entry k = (c, i, j) in the padded input
};

template <typename S>
struct Scratch {
  std::vector<S> xpad;  // [Cg, Hp, Wp]
  std::vector<S> gp;    // c-form: [T, OB]; t-form: the unfolded chunk [Kg, kChunk]
  std::vector<S> sum;   // t-form: [ob, Kg, L] per-lane sums over chunks
  int64_t packed = -1;  // n * groups + gi of the input in xpad
};

template <typename S>
MF_INLINE const S* pack_input(const Args<S>& a, int64_t n, int64_t gi, Scratch<S>& s) {
  const Conv2dGeom& g = a.g;
  const int64_t cg = g.cg();
  const S* src = a.act + (n * g.C + gi * cg) * g.H * g.W;
  if (!a.pad) return src;
  const int64_t key = n * g.groups + gi;
  if (s.packed == key) return s.xpad.data();
  s.xpad.assign(cg * a.Hp * a.Wp, S(0));
  for (int64_t c = 0; c < cg; ++c) {
    for (int64_t h = 0; h < g.H; ++h) {
      std::memcpy(s.xpad.data() + (c * a.Hp + h + g.ph) * a.Wp + g.pw, src + (c * g.H + h) * g.W,
                  sizeof(S) * g.W);
    }
  }
  s.packed = key;
  return s.xpad.data();
}

// gp[t, l] = grad_outputs[n, gi Og + o0 + l, t] for l < ov, else 0.
template <typename S, int OB>
MF_INLINE void pack_gout(const Args<S>& a, int64_t n, int64_t gi, int64_t o0, int64_t ov,
                         Scratch<S>& s) {
  const Conv2dGeom& g = a.g;
  const int64_t T = g.T();
  if (ov == OB) {
    s.gp.resize(T * OB);
  } else {
    s.gp.assign(T * OB, S(0));
  }
  S* dst = s.gp.data();
  const S* src = a.gout + (n * g.O + gi * g.og() + o0) * T;
  for (int64_t l = 0; l < ov; ++l) {
    const S* row = src + l * T;
    for (int64_t t = 0; t < T; ++t) dst[t * OB + l] = row[t];
  }
}

// tile[r, :] = sum_{y, x} base[r][y sh Wp + x sw] * gp[t, :] for r < R, t = (y, x): R kernel
// entries x OB output channels accumulated in registers over all output positions, flushed into
// the tile every kChunk positions (two-level summation: the rounding error grows with
// kChunk + T / kChunk rather than with T).
constexpr int64_t kChunk = 256;

template <typename S, int R>
MF_INLINE void tile_kernel(const S* const* base, const S* __restrict__ gp, const Conv2dGeom& g,
                           int64_t Wp, S* __restrict__ tile) {
  using V = typename Vec<S>::type;
  constexpr int L = Vec<S>::kLanes;
  constexpr int OB = kNV * L;
  V c[R][kNV];  // accumulators, in registers
  V sum[R][kNV];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) c[r][v] = sum[r][v] = V{};
  }
  const int64_t row_step = g.sh * Wp, sw = g.sw, Ho = g.Ho, Wo = g.Wo;
  int64_t since = 0;  // positions accumulated in c since the last flush
  for (int64_t y = 0; y < Ho; ++y) {
    const S* __restrict__ b[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) b[r] = base[r] + y * row_step;
    for (int64_t x = 0; x < Wo; ++x, gp += OB) {
      V gv[kNV];
#pragma GCC unroll 2
      for (int v = 0; v < kNV; ++v) gv[v] = loadu<V>(gp + v * L);
      const int64_t off = x * sw;
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const S sr = b[r][off];
#pragma GCC unroll 2
        for (int v = 0; v < kNV; ++v) c[r][v] += sr * gv[v];
      }
    }
    since += Wo;
    if (since >= kChunk) {
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
        for (int v = 0; v < kNV; ++v) {
          sum[r][v] += c[r][v];
          c[r][v] = V{};
        }
      }
      since = 0;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) storeu(tile + r * OB + v * L, sum[r][v] + c[r][v]);
  }
}

template <typename S, Epilogue E>
MF_INLINE void run_item(const Args<S>& a, int64_t w, Scratch<S>& s) {
  using V = typename Vec<S>::type;
  constexpr int L = Vec<S>::kLanes;
  constexpr int OB = kNV * L;
  const Conv2dGeom& g = a.g;
  const int64_t per_n = g.groups * a.nob;
  const int64_t n = w / per_n;
  const int64_t gi = (w % per_n) / a.nob;
  const int64_t ob = w % a.nob;
  const int64_t o0 = ob * OB;
  const int64_t ov = std::min<int64_t>(OB, g.og() - o0);
  const int64_t Kg = g.kg(), Wp = a.Wp;
  const S* xp = pack_input(a, n, gi, s);
  pack_gout<S, OB>(a, n, gi, o0, ov, s);
  const S* gp0 = s.gp.data();
  // Reductions: per-lane vector partial sums over kFlush tiles, then added to double sums
  // (kSqnorm: slot 0; kDot: slot j, m <= 64 per pass, see psg_conv2d_dot_cpu).
  constexpr int kSlots = E == Epilogue::kDot ? 64 : 1;
  constexpr int kFlush = 16;
  const int64_t jn = E == Epilogue::kDot ? std::min<int64_t>(a.m, 64) : 1;
  double red[kSlots] = {};
  V part[kSlots];
  for (int64_t jj = 0; jj < jn; ++jj) part[jj] = V{};
  int tiles_since = 0;
  auto flush = [&]() {
    for (int64_t jj = 0; jj < jn; ++jj) {
      double h = 0.0;
      for (int l = 0; l < L; ++l) h += part[jj][l];
      red[jj] += h;
      part[jj] = V{};
    }
    tiles_since = 0;
  };
  for (int64_t k0 = 0; k0 < Kg; k0 += kMR) {
    const int kr = static_cast<int>(std::min<int64_t>(kMR, Kg - k0));
    const S* base[kMR];
    for (int r = 0; r < kMR; ++r) base[r] = xp + a.koff[k0 + (r < kr ? r : 0)];
    alignas(64) S tile[kMR * OB];  // the R x OB tile of G_n^T, row r = kernel entry k0 + r
    switch (kr) {
      case kMR:
        tile_kernel<S, kMR>(base, gp0, g, Wp, tile);
        break;
      case 5:
        tile_kernel<S, 5>(base, gp0, g, Wp, tile);
        break;
      case 4:
        tile_kernel<S, 4>(base, gp0, g, Wp, tile);
        break;
      case 3:
        tile_kernel<S, 3>(base, gp0, g, Wp, tile);
        break;
      case 2:
        tile_kernel<S, 2>(base, gp0, g, Wp, tile);
        break;
      default:
        tile_kernel<S, 1>(base, gp0, g, Wp, tile);
    }
    if constexpr (E == Epilogue::kStore) {
      S* dst = a.out + (n * g.O + gi * g.og() + o0) * Kg + k0;
      for (int64_t l = 0; l < ov; ++l)
        for (int r = 0; r < kr; ++r) dst[l * Kg + r] = tile[r * OB + l];
    } else if constexpr (E == Epilogue::kSqnorm) {
      for (int r = 0; r < kr; ++r) {
        for (int v = 0; v < kNV; ++v) {
          const V q = loadu<V>(tile + r * OB + v * L);
          part[0] += q * q;
        }
      }
      if (++tiles_since == kFlush) flush();
    } else {
      const S* vt = a.vt + ((gi * a.nob + ob) * Kg + k0) * OB;
      const int64_t vstride = g.groups * a.nob * Kg * OB;
      for (int64_t jj = 0; jj < jn; ++jj) {
        const S* vj = vt + jj * vstride;
        for (int r = 0; r < kr; ++r)
          for (int v = 0; v < kNV; ++v)
            part[jj] += loadu<V>(tile + r * OB + v * L) * loadu<V>(vj + r * OB + v * L);
      }
      if (++tiles_since == kFlush) flush();
    }
  }
  if constexpr (E != Epilogue::kStore) {
    flush();
    for (int64_t jj = 0; jj < jn; ++jj) a.partial[w * jn + jj] = red[jj];
  }
}

// ---- t-form (small Kg) --------------------------------------------------------------------
constexpr int kTO = 4;          // output channels per t-form register tile
constexpr int kTK = 3;          // kernel entries per t-form register tile
constexpr int64_t kTMaxK = 64;  // t-form where Kg <= kTMaxK and T >= 8 Kg + 64 (see use_tform)
constexpr int64_t kTOB = 64;    // output channels per t-form work item

bool use_tform(const Conv2dGeom& g) { return g.kg() <= kTMaxK && g.T() >= 8 * g.kg() + 64; }

// u[k, p] = x[c, y sh + i dh, x sw + j dw] for output positions t = t0 + p = (y, x), p < len;
// zero for len <= p < lenp. k = (c, i, j) < Kg; u is [Kg, kChunk].
template <typename S>
MF_INLINE void unfold_chunk(const Args<S>& a, const S* xp, int64_t t0, int64_t len, int64_t lenp,
                            S* __restrict__ u) {
  const Conv2dGeom& g = a.g;
  const int64_t Wo = g.Wo, row_step = g.sh * a.Wp, sw = g.sw;
  for (int64_t k = 0; k < g.kg(); ++k) {
    const S* src0 = xp + a.koff[k];
    S* dst = u + k * kChunk;
    for (int64_t t = t0; t < t0 + len;) {
      const int64_t y = t / Wo, x = t % Wo, run = std::min(Wo - x, t0 + len - t);
      const S* src = src0 + y * row_step + x * sw;
      S* d = dst + (t - t0);
      if (sw == 1) {
        std::memcpy(d, src, sizeof(S) * run);
      } else {
        for (int64_t r = 0; r < run; ++r) d[r] = src[r * sw];
      }
      t += run;
    }
    for (int64_t p = len; p < lenp; ++p) dst[p] = S(0);
  }
}

// sum[o, k, :] += sum_{v < nvec} gr[o][v L : (v + 1) L] * ur[k][v L : (v + 1) L] for o < ov,
// k < KR: kTO x KR vector accumulators in registers (rows o >= ov repeat row 0 and are dropped).
template <typename S, int KR>
MF_INLINE void tile_t(const S* const* gr, const S* const* ur, int64_t nvec, S* sum, int64_t ostride,
                      int ov) {
  using V = typename Vec<S>::type;
  constexpr int L = Vec<S>::kLanes;
  V acc[kTO][KR];
#pragma GCC unroll 4
  for (int o = 0; o < kTO; ++o) {
#pragma GCC unroll 3
    for (int k = 0; k < KR; ++k) acc[o][k] = V{};
  }
  for (int64_t v = 0; v < nvec; ++v) {
    V u[KR];
#pragma GCC unroll 3
    for (int k = 0; k < KR; ++k) u[k] = loadu<V>(ur[k] + v * L);
#pragma GCC unroll 4
    for (int o = 0; o < kTO; ++o) {
      const V gv = loadu<V>(gr[o] + v * L);
#pragma GCC unroll 3
      for (int k = 0; k < KR; ++k) acc[o][k] += gv * u[k];
    }
  }
#pragma GCC unroll 4
  for (int o = 0; o < kTO; ++o) {
    if (o >= ov) break;
#pragma GCC unroll 3
    for (int k = 0; k < KR; ++k) {
      S* p = sum + o * ostride + k * L;
      storeu(p, loadu<V>(p) + acc[o][k]);
    }
  }
}

template <typename S, Epilogue E>
MF_INLINE void run_item_t(const Args<S>& a, int64_t w, Scratch<S>& s) {
  constexpr int L = Vec<S>::kLanes;
  const Conv2dGeom& g = a.g;
  const int64_t per_n = g.groups * a.nob;
  const int64_t n = w / per_n;
  const int64_t gi = (w % per_n) / a.nob;
  const int64_t o0 = (w % a.nob) * a.ob;
  const int64_t ov = std::min<int64_t>(a.ob, g.og() - o0);
  const int64_t Kg = g.kg(), T = g.T();
  const S* xp = pack_input(a, n, gi, s);
  const S* g0 = a.gout + (n * g.O + gi * g.og() + o0) * T;  // row o: g0 + o T
  s.gp.resize(Kg * kChunk);
  s.sum.assign(ov * Kg * L, S(0));
  S* u = s.gp.data();
  S* sum = s.sum.data();
  alignas(64) S gtail[kTO * L];  // the last partial vector of kTO rows, zero-padded
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t len = std::min<int64_t>(kChunk, T - t0);
    const int64_t nvec = len / L, rem = len % L;
    unfold_chunk(a, xp, t0, len, rem ? (nvec + 1) * L : len, u);
    for (int64_t oi = 0; oi < ov; oi += kTO) {
      const int ot = static_cast<int>(std::min<int64_t>(kTO, ov - oi));
      const S* gr[kTO];
      const S* gt[kTO];
      for (int o = 0; o < kTO; ++o) {
        gr[o] = g0 + (oi + (o < ot ? o : 0)) * T + t0;
        gt[o] = gtail + o * L;
        if (rem) {
          for (int l = 0; l < L; ++l) gtail[o * L + l] = l < rem ? gr[o][nvec * L + l] : S(0);
        }
      }
      for (int64_t k0 = 0; k0 < Kg; k0 += kTK) {
        const int kr = static_cast<int>(std::min<int64_t>(kTK, Kg - k0));
        const S* ur[kTK];
        const S* ut[kTK];
        for (int k = 0; k < kTK; ++k) {
          ur[k] = u + (k0 + (k < kr ? k : 0)) * kChunk;
          ut[k] = ur[k] + nvec * L;
        }
        S* sk = sum + (oi * Kg + k0) * L;
        const int64_t os = Kg * L;
        switch (kr) {
          case kTK:
            tile_t<S, kTK>(gr, ur, nvec, sk, os, ot);
            if (rem) tile_t<S, kTK>(gt, ut, 1, sk, os, ot);
            break;
          case 2:
            tile_t<S, 2>(gr, ur, nvec, sk, os, ot);
            if (rem) tile_t<S, 2>(gt, ut, 1, sk, os, ot);
            break;
          default:
            tile_t<S, 1>(gr, ur, nvec, sk, os, ot);
            if (rem) tile_t<S, 1>(gt, ut, 1, sk, os, ot);
        }
      }
    }
  }
  // G[o, k] = the sum over the lanes, then the epilogue
  const int64_t jn = E == Epilogue::kDot ? std::min<int64_t>(a.m, 64) : 1;
  double red[E == Epilogue::kDot ? 64 : 1] = {};
  const int64_t row0 = gi * g.og() + o0;  // first output channel of the item
  for (int64_t o = 0; o < ov; ++o) {
    for (int64_t k = 0; k < Kg; ++k) {
      const S* p = sum + (o * Kg + k) * L;
      S lanes = 0;  // (L terms, each a two-level sum: the input precision is enough)
      for (int l = 0; l < L; ++l) lanes += p[l];
      const double gk = lanes;
      if constexpr (E == Epilogue::kStore) {
        a.out[(n * g.O + row0 + o) * Kg + k] = static_cast<S>(gk);
      } else if constexpr (E == Epilogue::kSqnorm) {
        red[0] += gk * gk;
      } else {
        for (int64_t jj = 0; jj < jn; ++jj) red[jj] += gk * a.vt[(jj * g.O + row0 + o) * Kg + k];
      }
    }
  }
  if constexpr (E != Epilogue::kStore) {
    for (int64_t jj = 0; jj < jn; ++jj) a.partial[w * jn + jj] = red[jj];
  }
}

template <typename S, Epilogue E>
MF_INLINE void run_items_in(const Args<S>& a, int64_t w0, int64_t w1) {
  Scratch<S> s;
  for (int64_t w = w0; w < w1; ++w) {
    if (a.tform) {
      run_item_t<S, E>(a, w, s);
    } else {
      run_item<S, E>(a, w, s);
    }
  }
}

template <typename S, Epilogue E>
__attribute__((target("avx2,fma"))) void run_items_avx2(const Args<S>& a, int64_t w0, int64_t w1) {
  run_items_in<S, E>(a, w0, w1);
}

template <typename S, Epilogue E>
void run_items_generic(const Args<S>& a, int64_t w0, int64_t w1) {
  run_items_in<S, E>(a, w0, w1);
}

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

template <typename S, Epilogue E>
void run_items(const Args<S>& a, int64_t items) {
  const bool avx2 = cpu_has_avx2();
  const int64_t work = std::max<int64_t>(1, a.g.T() * a.g.kg() * a.ob);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / work);
  at::parallel_for(0, items, grain, [&](int64_t w0, int64_t w1) {
    if (avx2) {
      run_items_avx2<S, E>(a, w0, w1);
    } else {
      run_items_generic<S, E>(a, w0, w1);
    }
  });
}

struct Prepared {
  Conv2dGeom g;
  at::Tensor a, go;
  bool empty;                 // no work: the result is all zeros
  std::vector<int64_t> koff;  // see Args::koff
};

Prepared prepare(const char* op, const at::Tensor& activations, const at::Tensor& grad_outputs,
                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, int64_t groups) {
  const Conv2dGeom g = check_conv2d_inputs(op, activations, grad_outputs, kernel_size, stride,
                                           padding, dilation, groups, /*cuda=*/false);
  const bool empty = g.N == 0 || g.O == 0 || g.kg() == 0 || g.T() == 0;
  std::vector<int64_t> koff(g.kg());
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw, kk = g.kh * g.kw;
  for (int64_t k = 0; k < g.kg(); ++k) {
    const int64_t c = k / kk, i = (k % kk) / g.kw, j = k % g.kw;
    koff[k] = (c * Hp + i * g.dh) * Wp + j * g.dw;
  }
  return {g, activations.contiguous(), grad_outputs.contiguous(), empty, std::move(koff)};
}

template <typename S>
Args<S> make_args(const Prepared& p) {
  const Conv2dGeom& g = p.g;
  constexpr int OB = kNV * Vec<S>::kLanes;
  Args<S> args{};
  args.g = g;
  args.act = p.a.const_data_ptr<S>();
  args.gout = p.go.const_data_ptr<S>();
  args.koff = p.koff.data();
  args.tform = use_tform(g);
  args.ob = args.tform ? std::min<int64_t>(kTOB, std::max<int64_t>(1, g.og())) : OB;
  args.nob = (g.og() + args.ob - 1) / args.ob;
  args.pad = g.ph > 0 || g.pw > 0;
  args.Hp = g.H + 2 * g.ph;
  args.Wp = g.W + 2 * g.pw;
  return args;
}

at::Tensor psg_conv2d_cpu(const at::Tensor& activations, const at::Tensor& grad_outputs,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Prepared p = prepare("psg_conv2d", activations, grad_outputs, kernel_size, stride, padding,
                             dilation, groups);
  const Conv2dGeom& g = p.g;
  const auto opts = p.a.options();
  if (p.empty) return at::zeros({g.N, g.O, g.cg(), g.kh, g.kw}, opts);
  auto out = at::empty({g.N, g.O, g.cg(), g.kh, g.kw}, opts);
  AT_DISPATCH_FLOATING_TYPES(p.a.scalar_type(), "psg_conv2d_cpu", [&] {
    Args<scalar_t> args = make_args<scalar_t>(p);
    args.out = out.mutable_data_ptr<scalar_t>();
    run_items<scalar_t, Epilogue::kStore>(args, g.N * g.groups * args.nob);
  });
  return out;
}

at::Tensor psg_conv2d_sqnorm_cpu(const at::Tensor& activations, const at::Tensor& grad_outputs,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const Prepared p = prepare("psg_conv2d_sqnorm", activations, grad_outputs, kernel_size, stride,
                             padding, dilation, groups);
  const Conv2dGeom& g = p.g;
  if (p.empty) return at::zeros({g.N}, p.a.options());
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES(p.a.scalar_type(), "psg_conv2d_sqnorm_cpu", [&] {
    Args<scalar_t> args = make_args<scalar_t>(p);
    const int64_t per_n = g.groups * args.nob;
    partial = at::empty({g.N, per_n}, p.a.options().dtype(at::kDouble));
    args.partial = partial.mutable_data_ptr<double>();
    run_items<scalar_t, Epilogue::kSqnorm>(args, g.N * per_n);
  });
  return partial.sum(1).to(p.a.scalar_type());
}

// vectors [m, O, Cg, kh, kw] -> [m, groups, nob, Kg, OB], channel-padded with zeros.
template <typename S>
at::Tensor pack_vectors(const at::Tensor& v, const Conv2dGeom& g, int64_t nob) {
  constexpr int OB = kNV * Vec<S>::kLanes;
  const int64_t m = v.size(0), Kg = g.kg(), og = g.og();
  auto vt = at::zeros({m, g.groups, nob, Kg, OB}, v.options());
  const S* src = v.const_data_ptr<S>();
  S* dst = vt.mutable_data_ptr<S>();
  // serial: m x P copies are small, and a parallel region costs more than them when the cores
  // are shared (measured: dots 1.2-1.3x vs psg 0.95x of fwd+bwd at 2 threads under load)
  for (int64_t b = 0; b < m * g.groups * nob; ++b) {
    const int64_t j = b / (g.groups * nob), gi = (b / nob) % g.groups, ob = b % nob;
    const int64_t o0 = ob * OB, ov = std::min<int64_t>(OB, og - o0);
    for (int64_t l = 0; l < ov; ++l) {
      const S* row = src + (j * g.O + gi * og + o0 + l) * Kg;
      for (int64_t k = 0; k < Kg; ++k) dst[(b * Kg + k) * OB + l] = row[k];
    }
  }
  return vt;
}

at::Tensor psg_conv2d_dot_cpu(const at::Tensor& activations, const at::Tensor& grad_outputs,
                              const at::Tensor& vectors, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  const Prepared p = prepare("psg_conv2d_dot", activations, grad_outputs, kernel_size, stride,
                             padding, dilation, groups);
  const Conv2dGeom& g = p.g;
  check_conv2d_vectors("psg_conv2d_dot", vectors, g, activations);
  const int64_t M = vectors.size(0);
  if (p.empty || M == 0) return at::zeros({g.N, M}, p.a.options());
  const auto v = vectors.contiguous();
  at::Tensor out = at::zeros({g.N, M}, at::TensorOptions().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(p.a.scalar_type(), "psg_conv2d_dot_cpu", [&] {
    Args<scalar_t> args = make_args<scalar_t>(p);
    const int64_t per_n = g.groups * args.nob;
    // at most 64 vectors per pass (the per-item accumulators live on the stack)
    for (int64_t j0 = 0; j0 < M; j0 += 64) {
      const int64_t mj = std::min<int64_t>(64, M - j0);
      const at::Tensor vj = v.narrow(0, j0, mj);  // contiguous (rows of a contiguous tensor)
      const at::Tensor vt = args.tform ? vj : pack_vectors<scalar_t>(vj, g, args.nob);
      at::Tensor partial = at::empty({g.N, per_n, mj}, p.a.options().dtype(at::kDouble));
      args.vt = vt.const_data_ptr<scalar_t>();
      args.m = mj;
      args.partial = partial.mutable_data_ptr<double>();
      run_items<scalar_t, Epilogue::kDot>(args, g.N * per_n);
      out.narrow(1, j0, mj).copy_(partial.sum(1));
    }
  });
  return out.to(p.a.scalar_type());
}

#undef MF_INLINE

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CPU, m) {
  m.impl("psg_conv2d", &metafluence::psg_conv2d_cpu);
  m.impl("psg_conv2d_sqnorm", &metafluence::psg_conv2d_sqnorm_cpu);
  m.impl("psg_conv2d_dot", &metafluence::psg_conv2d_dot_cpu);
}
