// CPU kernels of cross_entropy_forward / _backward / _forward_inplace.
//
// Per position, one read of its logits row for the online statistics (the target
// logit and the smoothing / probability-target sums come from the same row while it
// is in cache), then the loss; backward re-reads the row once and writes the
// gradient once. The in-place variant writes the gradient into the logits right
// after the statistics, so the row is read from memory once and written once.
// Rows with unit class stride are worked on in place; other layouts (class dim 1 of
// [N, C, d...]) and softcapped logits go through a per-thread contiguous row buffer,
// consecutive positions sharing cache lines.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>
#include <utility>
#include <vector>

#include <alchemy/cross_entropy.h>
#include <alchemy/cross_entropy_host.h>

#include "cross_entropy_rows.h"
#include "huge_pages.h"
#include "row_stats.h"
#include "vec_math.h"

namespace alchemy::cpu {
namespace {

// T = sum_c w_c t'_c of a probability target row.
template <typename acc_t, typename T>
acc_t prob_target_mass(const T* t, const RowContext<acc_t>& ctx) {
  return row_sum<acc_t>(
      ctx.cfg.classes, [&](int64_t c) { return weighted_prob(t, ctx.w, c, ctx.cfg); },
      [&](int64_t c) { return weighted_prob_at(t, ctx.w, c, ctx.cfg); });
}

// Loss and saved lse of one row whose class index y is valid (or of a probability row).
// The sums over the row are taken relative to its max (see cross_entropy.h, Precision).
template <typename acc_t, typename R, typename T>
std::pair<acc_t, double> row_loss(const R* z, const T* t, int64_t y, const RowContext<acc_t>& ctx) {
  using Vec = at::vec::Vectorized<acc_t>;
  const auto& cfg = ctx.cfg;
  const RowLogSumExp<acc_t> l = row_log_sum_exp(row_stats(z, cfg.classes, acc_t(1)));
  const Vec vmax(l.max);
  if (t != nullptr) {
    // Per element, as PyTorch: a zero target at a -inf logit gives NaN, a smoothed one +inf.
    const acc_t dot = row_sum<acc_t>(
        cfg.classes, [&](int64_t c) { return weighted_prob(t, ctx.w, c, cfg) * (load_acc(z + c) - vmax); },
        [&](int64_t c) { return weighted_prob_at(t, ctx.w, c, cfg) * (static_cast<acc_t>(z[c]) - l.max); });
    return {prob_target_loss(l, prob_target_mass(t, ctx), dot, cfg), saved_lse(l)};
  }
  const acc_t weighted_sum = cfg.smoothing > 0 ? shifted_weighted_sum(z, ctx.w, cfg.classes, l.max) : acc_t(0);
  const acc_t loss = class_target_loss(l, static_cast<acc_t>(z[y]), weight_at(ctx.w, y), weighted_sum, cfg);
  return {loss, saved_lse(l)};
}

// dx = g * (a * p_c - b_c) * dz/dx for one row, p_c = exp(z_c - lse). x_target is the
// uncapped logit at y, read before dx (which may alias z) is written.
template <typename acc_t, typename R, typename T, typename D>
void row_grad(const R* z, const T* t, int64_t y, acc_t x_target, acc_t g, SplitLse<acc_t> lse,
              const RowContext<acc_t>& ctx, D* dx, bool stream = false) {
  const auto& cfg = ctx.cfg;
  const int64_t C = cfg.classes;
  const bool soft = t != nullptr;
  const acc_t w_y = soft ? acc_t(0) : weight_at(ctx.w, y);
  const acc_t a = grad_prob_coeff(soft ? prob_target_mass(t, ctx) : class_target_mass(w_y, cfg), lse, cfg);
  const acc_t target_grad = soft ? acc_t(0) : class_target_grad_at_target(g, x_target, lse, w_y, cfg);
  // dx = ga * p - g * b: ga and g * b are per-row constants unless b varies per class.
  write_row_grad(z, t, ctx, g * a, g * cfg.smoothing / acc_t(C), g, lse, dx, stream);
  if (!soft) dx[y] = static_cast<D>(target_grad);  // p_y - 1 formed in acc_t, rounded once
}

template <typename scalar_t, typename acc_t>
void gather(const scalar_t* t, int64_t stride, int64_t C, acc_t* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(t[c * stride]);
}

template <typename scalar_t, typename acc_t>
void fill_row(scalar_t* dx, int64_t stride, int64_t C, acc_t value) {
  for (int64_t c = 0; c < C; ++c) dx[c * stride] = static_cast<scalar_t>(value);
}

template <typename scalar_t, typename acc_t>
void scatter(const acc_t* src, int64_t C, scalar_t* dx, int64_t stride) {
  for (int64_t c = 0; c < C; ++c) dx[c * stride] = static_cast<scalar_t>(src[c]);
}

enum class RowKind { Ignored, Bad, Valid };

// Rows of up to this many classes (unit class stride) go kVec positions at a time through the
// lanes path, copied transposed into a buffer: a short row would otherwise pay horizontal
// reductions and a scalar tail of C % kVec exps each. Measured (benchmarks/short_rows.py): the
// forward gains up to C = 21 and breaks even at 100; the backward (since the vector target
// gradient) at 21 too: [4096, 21] 0.074 against 0.167 ms row by row (Xeon, AVX-512).
constexpr int64_t kTransposedMaxClasses = 32;

// How positions map to work: one row at a time; kVec adjacent positions as the lanes of one
// vector in place (class dim 1 of [N, C, d...]); or blocks of kVec short rows transposed.
enum class PositionPath { Rows, Lanes, Transposed };

// Vectors of positions per block of the Lanes path (see LaneBlock): 4 below 16 classes, 2 up to
// 32, from 32 classes runs of 512 bytes per class. On [8, C, 64, 64] a block's class rows lie
// 16 KB apart. Measured on AVX2 (AMD EPYC, 8 lanes): 4 vectors are faster than 2 at C = 2
// (forward 0.26 against 0.34 ms) and 10, slower at C = 100 (backward 9.6 against 4.8 ms: runs
// of 128 bytes at that stride conflict in the caches). On AVX-512 (Xeon, 16 lanes), backward
// at C = 100: 6.1 / 2.1 / 1.4 / 1.2 / 1.1 ms with runs of 64 / 128 / 256 / 512 / 1024 bytes,
// forward best at 512 (0.64 against 0.90 ms at 128); at C = 32 and 64 512 also wins, at
// C = 21 it is level. Softmax's lanes (softmax.cpp) found the same on AVX2: long runs stream.
constexpr int kBlockVectors = 2, kBlockVectorsFewClasses = 4;
constexpr int64_t kFewClasses = 16, kWideBlockClasses = 32;
template <typename scalar_t>
constexpr int wide_block_vectors =
    std::max<int>(1, 512 / (AccVec<scalar_t>::size() * sizeof(acc_type<scalar_t>)));

// Lanes in place needs the class dim strided while positions are adjacent in every operand.
template <typename scalar_t>
PositionPath position_path(const CrossEntropyProblem& p, const RowStrides* out) {
  if (p.xs.cls == 1) {
    return p.classes <= kTransposedMaxClasses ? PositionPath::Transposed : PositionPath::Rows;
  }
  const bool lanes = p.xs.inner == 1 && p.inner >= AccVec<scalar_t>::size() && (!p.soft || p.ts.inner == 1) &&
                     (out == nullptr || out->inner == 1);
  return lanes ? PositionPath::Lanes : PositionPath::Rows;
}

// The problem's data pointers, taken once per launch (each const_data_ptr call checks storage
// and dtype: a share of a few-class block's cost if taken per block).
template <typename scalar_t>
struct Operands {
  const scalar_t* x;
  const int64_t* targets;  // class indices, or nullptr
  const scalar_t* probs;   // probability targets, or nullptr

  explicit Operands(const CrossEntropyProblem& p)
      : x(p.x.const_data_ptr<scalar_t>()),
        targets(p.soft ? nullptr : p.target.const_data_ptr<int64_t>()),
        probs(p.soft ? p.target.const_data_ptr<scalar_t>() : nullptr) {}
};

// Runs body(r, kind, y, z_row, t_row) over every position in parallel, with z_row the
// row's (capped) logits and t_row its probability target (nullptr for class indices),
// each either in place (unit stride, no softcap) or in this thread's buffers. On the Lanes
// path, groups of w * kVec adjacent positions go to block(r0, w * kVec, w) instead, w =
// kBlockVectors(FewClasses), wide_block_vectors or 1 (std::integral_constant); on the Transposed path every
// position goes to block(r0, rows, 1), rows <= kVec.
template <typename scalar_t, typename Body, typename BlockBody>
void for_each_position(const CrossEntropyProblem& p, const Operands<scalar_t>& ops, PositionPath path, const Body& body,
                       const BlockBody& block) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kVec = AccVec<scalar_t>::size();
  const scalar_t* x = ops.x;
  const int64_t C = p.classes, inner = p.inner;
  const int64_t* targets = ops.targets;
  const scalar_t* probs = ops.probs;
  const bool z_in_place = p.xs.cls == 1 && !(p.softcap > 0);
  const auto softcap = static_cast<acc_t>(p.softcap);
  auto visit = [&](int64_t r, RowBuffers<acc_t>& buf) {
    const int64_t o = r / inner, i = r % inner;
    const scalar_t* xr = x + o * p.xs.outer + i * p.xs.inner;
    const int64_t y = targets ? targets[r] : 0;
    if (targets && y == p.ignore_index) return body(r, RowKind::Ignored, y, xr, static_cast<const scalar_t*>(nullptr));
    if (targets && !target_in_range(y, C)) return body(r, RowKind::Bad, y, xr, static_cast<const scalar_t*>(nullptr));
    auto with_target = [&](const auto* zr) {
      if (!probs) return body(r, RowKind::Valid, y, zr, static_cast<const scalar_t*>(nullptr));
      const scalar_t* tr = probs + o * p.ts.outer + i * p.ts.inner;
      if (p.ts.cls == 1) return body(r, RowKind::Valid, y, zr, tr);
      gather(tr, p.ts.cls, C, buf.t.data());
      body(r, RowKind::Valid, y, zr, static_cast<const acc_t*>(buf.t.data()));
    };
    if (z_in_place) return with_target(xr);
    gather_capped(xr, p.xs.cls, softcap, C, buf.z.data());
    with_target(static_cast<const acc_t*>(buf.z.data()));
  };
  if (path == PositionPath::Rows) {
    at::parallel_for(0, p.rows(), task_grain(p.rows(), C), [&](int64_t begin, int64_t end) {
      RowBuffers<acc_t>& buf = row_buffers<acc_t>(C);
      for (int64_t r = begin; r < end; ++r) visit(r, buf);
      stream_fence();  // streamed stores are visible before the task counts as done
    });
    return;
  }
  constexpr std::integral_constant<int, 1> one_vector;
  if (path == PositionPath::Transposed) {
    const int64_t rows = p.rows(), blocks = (rows + kVec - 1) / kVec;
    at::parallel_for(0, blocks, task_grain(blocks, C * kVec), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) block(b * kVec, std::min(kVec, rows - b * kVec), one_vector);
    });
    return;
  }
  auto lanes = [&](auto wide) {
    constexpr int64_t kSpan = decltype(wide)::value * kVec;
    const int64_t blocks = (inner + kSpan - 1) / kSpan;
    at::parallel_for(0, p.outer * blocks, task_grain(p.outer * blocks, C * kSpan), [&](int64_t begin, int64_t end) {
      RowBuffers<acc_t>& buf = row_buffers<acc_t>(C);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t o = b / blocks;
        int64_t i = (b % blocks) * kSpan;
        if (i + kSpan <= inner) {
          block(o * inner + i, kSpan, wide);
          continue;
        }
        for (; i + kVec <= inner; i += kVec) block(o * inner + i, kVec, one_vector);
        for (; i < inner; ++i) visit(o * inner + i, buf);
      }
      stream_fence();
    });
  };
  if (C < kFewClasses) return lanes(std::integral_constant<int, kBlockVectorsFewClasses>{});
  if (C >= kWideBlockClasses) return lanes(std::integral_constant<int, wide_block_vectors<scalar_t>>{});
  lanes(std::integral_constant<int, kBlockVectors>{});
}

// The lanes path: W * kVec positions, vector w holding lanes [w * kVec, (w + 1) * kVec) (the
// classes of lane l at xb + l + c * x_cls), looping over the classes; the same math as the rows,
// lane by lane. W > 1 gives the exp and sum chains of independent vectors to interleave and reads
// whole cache lines per class (see softmax.cpp's lanes blocks).
template <typename scalar_t, int W = 1>
struct LaneBlock {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  static constexpr int K = Vec::size();
  static constexpr int kLanes = W * K;

  // Each lane's lse as hi + lo (SplitLse, W vectors of it): the saved fp64 lse split, or in the
  // in-place forward the row's max and log-sum-exp.
  struct Lse {
    Vec hi[W];
    Vec lo[W];
  };

  // The upstream gradient and the saved lse of kLanes positions (rows <= kLanes of them; the
  // other lanes get 0) as gradient() takes them.
  static void load_saved(const acc_t* g, const double* lse, int64_t rows, Vec* g_out, Lse& split) {
    acc_t g_pad[kLanes] = {};
    double lse_pad[kLanes] = {};
    if (rows < kLanes) {
      std::copy_n(g, rows, g_pad);
      std::copy_n(lse, rows, lse_pad);
      g = g_pad, lse = lse_pad;
    }
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      g_out[w] = Vec::loadu(g + w * K);
      load_split_lse(lse + w * K, split.hi[w], split.lo[w]);
    }
  }

  const CrossEntropyProblem& p;
  const RowContext<acc_t>& ctx;
  const scalar_t* xb;  // class 0 of the first lane
  int64_t x_cls;       // class stride of xb
  const scalar_t* tb;  // its probability target, or nullptr
  int64_t t_cls;       // class stride of tb
  const int64_t* targets;  // the lanes' class indices, or nullptr (probability targets)
  Vec y[W];            // class index per lane (-1 where not valid)
  Vec w_y[W];          // weight at the class index (0 where not valid)
  Vec fill[W];         // what a lane that is not valid gets: 0 (ignored) or NaN (bad index)
  Vec invalid[W];      // mask of those lanes
  bool any_invalid = false;

  // lane_targets: the kLanes lanes' class indices (unread for probability targets).
  LaneBlock(const CrossEntropyProblem& problem, const RowContext<acc_t>& context, const scalar_t* x_block,
            int64_t x_class_stride, const int64_t* lane_targets, const scalar_t* t_block, int64_t t_class_stride)
      : p(problem),
        ctx(context),
        xb(x_block),
        x_cls(x_class_stride),
        tb(t_block),
        t_cls(t_class_stride),
        targets(p.soft ? nullptr : lane_targets) {
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      if (p.soft) {  // every lane valid, no class index
        y[w] = Vec(-1), w_y[w] = Vec(0), fill[w] = Vec(0), invalid[w] = Vec(0);
      } else {
        decode_targets(lane_targets + w * K, w);
      }
    }
  }

  // The K class indices at t as floating-point lanes, in vector registers: each index, -1 for
  // ignore_index, -2 for an index out of range (scalar per-lane checks were a third of a
  // few-class block's instructions).
  void decode_targets(const int64_t* t, int w) {
    using IVec = at::vec::Vectorized<int64_t>;
    constexpr int kPieces = K / IVec::size();
    static_assert(kPieces * IVec::size() == K);
    at::vec::VectorizedN<int64_t, kPieces> code;
    ALCHEMY_UNROLL
    for (int i = 0; i < kPieces; ++i) {
      const IVec v = IVec::loadu(t + i * IVec::size());
      const IVec in_range = (v >= IVec(0)) & (v < IVec(p.classes));
      code[i] = IVec::blendv(IVec::blendv(IVec(-2), v, in_range), IVec(-1), v == IVec(p.ignore_index));
    }
    const Vec lanes = at::vec::convert<acc_t, 1, int64_t, kPieces>(code), zero(0);
    invalid[w] = lanes < zero;
    y[w] = Vec::blendv(lanes, Vec(-1), invalid[w]);
    fill[w] = Vec::blendv(Vec(std::numeric_limits<acc_t>::quiet_NaN()), zero, lanes == Vec(-1));
    any_invalid |= invalid[w].zero_mask() != (1 << K) - 1;
    if (ctx.w == nullptr) {
      w_y[w] = Vec::blendv(Vec(1), zero, invalid[w]);
      return;
    }
    acc_t ws[K];
    for (int l = 0; l < K; ++l) ws[l] = target_in_range(t[l], p.classes) && t[l] != p.ignore_index ? ctx.w[t[l]] : acc_t(0);
    w_y[w] = from_lanes(ws, std::make_integer_sequence<int, K>{});
  }

  // A vector of K scalars built in registers: a vector load of scalars just stored to memory
  // stalls (no store-to-load forwarding across the stores), a measurable share of a block.
  template <int... I>
  static Vec from_lanes(const acc_t* v, std::integer_sequence<int, I...>) {
    return Vec(v[I]...);
  }

  // The block of kLanes adjacent positions from r0 read in place (the Lanes path).
  static LaneBlock in_place(const CrossEntropyProblem& p, const RowContext<acc_t>& ctx,
                            const Operands<scalar_t>& ops, int64_t r0) {
    const int64_t o = r0 / p.inner, i0 = r0 % p.inner;
    return LaneBlock(p, ctx, ops.x + o * p.xs.outer + i0, p.xs.cls, p.soft ? nullptr : ops.targets + r0,
                     p.soft ? ops.probs + o * p.ts.outer + i0 : nullptr, p.ts.cls);
  }

  Vec logits(int w, int64_t c) const {
    const Vec x = load_acc(xb + w * K + c * x_cls);
    if (!(ctx.cfg.softcap > 0)) return x;
    return Vec(ctx.cfg.softcap) * (x * Vec(acc_t(1) / ctx.cfg.softcap)).tanh();
  }

  Vec weight(int64_t c) const { return Vec(weight_at(ctx.w, c)); }

  Vec weighted_prob(int w, int64_t c) const {  // w_c t'_c
    const auto& cfg = ctx.cfg;
    return weight(c) * at::vec::fmadd(load_acc(tb + w * K + c * t_cls), Vec(acc_t(1) - cfg.smoothing),
                                      Vec(cfg.smoothing / acc_t(cfg.classes)));
  }

  // Loss and saved lse of every lane, in two passes over the classes (the block's class rows
  // stay in cache between them): the max, then the sums relative to it. split (if not nullptr)
  // gets each lane's lse as max + log_sum.
  void forward(acc_t* loss, double* lse, Lse* split) const {
    const auto& cfg = ctx.cfg;
    const int64_t C = cfg.classes;
    const bool sums = p.soft || cfg.smoothing > 0;
    const Vec ninf(neg_inf<acc_t>()), zero(0);
    Vec shift[W];
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) shift[w] = ninf;
    for (int64_t c = 0; c < C; ++c) {
      ALCHEMY_UNROLL
      for (int w = 0; w < W; ++w) shift[w] = running_max(shift[w], logits(w, c));
    }
    // vsum is compensated (Kahan): one lane sums one position's classes in sequence, and a confident
    // row's small terms would each round away against its 1, which p_y - 1 in backward depends on.
    Vec vmax[W], vsum[W], vsum_lost[W], zy[W], s1[W], s2[W];
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      vmax[w] = shift[w];
      shift[w] = Vec::blendv(shift[w], zero, shift[w] == ninf);  // lane-wise finite_shift
      vsum[w] = vsum_lost[w] = zy[w] = s1[w] = s2[w] = zero;
    }
    for (int64_t c = 0; c < C; ++c) {
      const Vec class_c(static_cast<acc_t>(c)), w_c = weight(c);
      ALCHEMY_UNROLL
      for (int w = 0; w < W; ++w) {
        const Vec z = logits(w, c);
        const Vec term = fast_exp(z - shift[w]) - vsum_lost[w], sum = vsum[w] + term;
        vsum_lost[w] = (sum - vsum[w]) - term;
        vsum[w] = sum;
        if (p.soft) {
          const Vec q = weighted_prob(w, c);
          s1[w] += q;
          s2[w] += q * (z - shift[w]);
        } else {
          zy[w] = Vec::blendv(zy[w], z, y[w] == class_c);
          if (sums) s1[w] += w_c * (z - shift[w]);
        }
      }
    }
    // The epilogue, lane-wise: row_log_sum_exp (NaN parts for a max of NaN or +-inf), then
    // class_target_loss / prob_target_loss of cross_entropy.h on vectors. The sums are relative to
    // the max in every lane whose max is finite, and NaN in the others.
    const Vec nan(std::numeric_limits<acc_t>::quiet_NaN()), limit(-neg_inf<acc_t>());
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      const Vec finite = vmax[w].abs() < limit;
      const Vec max = Vec::blendv(nan, vmax[w], finite), log_sum = Vec::blendv(nan, vsum[w].log(), finite);
      const Vec lse_value = max + log_sum;
      Vec l;
      if (p.soft) {
        l = s1[w] * log_sum - s2[w];
      } else {
        l = Vec(acc_t(1) - cfg.smoothing) * w_y[w] * (log_sum - (zy[w] - max));
        if (sums) l += Vec(cfg.smoothing / acc_t(C)) * (Vec(cfg.weight_sum) * log_sum - s1[w]);
      }
      l += Vec(cfg.z_loss) * lse_value * lse_value;
      if (any_invalid) l = Vec::blendv(l, fill[w], invalid[w]);
      l.store(loss + w * K);
      const Vec hi = Vec::blendv(max, fill[w], invalid[w]), lo = Vec::blendv(log_sum, fill[w], invalid[w]);
      acc_t m[K], ls[K];
      hi.store(m);
      lo.store(ls);
      for (int k = 0; k < K; ++k) lse[w * K + k] = saved_lse(RowLogSumExp<acc_t>{m[k], ls[k]});
      if (split) split->hi[w] = hi, split->lo[w] = lo;
    }
  }

  // dx = g * (a * p_c - b_c) * dz/dx for every lane, with lse = hi + lo per lane; g holds W vectors.
  template <typename D>
  void gradient(const Vec* g, const Lse& lse, D* db, int64_t dcls, bool stream) const {
    const auto& cfg = ctx.cfg;
    const int64_t C = cfg.classes;
    const Vec* hi = lse.hi;
    const Vec* lo = lse.lo;
    // a = grad_prob_coeff(target mass, lse) per lane, times g.
    Vec va[W], target_term[W];
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      target_term[w] = w_y[w] * Vec(acc_t(1) - cfg.smoothing);
      Vec mass = target_term[w] + Vec(cfg.smoothing / acc_t(C) * cfg.weight_sum);  // class_target_mass
      if (p.soft) {
        mass = Vec(0);
        for (int64_t c = 0; c < C; ++c) mass += weighted_prob(w, c);
      }
      va[w] = (mass + Vec(acc_t(2) * cfg.z_loss) * (hi[w] + lo[w])) * g[w];
    }
    // The target class's p_y - 1 needs exp exact near 1 (fast_exp is off by up to ~20 ulp, the size
    // of 1 - p_y for a confident prediction): formed with fast_expm1 after the vector loop, from the target
    // logits z_y picked up in it (each read before db, which may alias the logits, is written).
    Vec z_y[W];
    const Vec spread(cfg.smoothing / acc_t(C)), zero(0);
    const Vec inv_cap(cfg.softcap > 0 ? acc_t(1) / cfg.softcap : acc_t(0)), one(1);
    for (int64_t c = 0; c < C; ++c) {
      const Vec class_c(static_cast<acc_t>(c)), spread_c = weight(c) * spread;
      ALCHEMY_UNROLL
      for (int w = 0; w < W; ++w) {
        const Vec z = logits(w, c);
        Vec b;
        if (p.soft) {
          b = weighted_prob(w, c);
        } else {
          const Vec is_target = y[w] == class_c;
          b = spread_c + Vec::blendv(zero, target_term[w], is_target);
          z_y[w] = c == 0 ? z : Vec::blendv(z_y[w], z, is_target);
        }
        Vec d = va[w] * fast_exp((z - hi[w]) - lo[w]) - g[w] * b;
        if (cfg.softcap > 0) {
          const Vec th = z * inv_cap;  // z = softcap * tanh(x / softcap)
          d = d * (one - th * th);
        }
        if (any_invalid) d = Vec::blendv(d, fill[w], invalid[w]);
        D* dc = db + w * K + c * dcls;
        stream ? store_acc_stream(dc, d) : store_acc(dc, d);
      }
    }
    if (p.soft) return;
    // class_target_grad_at_target on vectors: g (a p - b) = g (1 - eps) w_y (p - 1) - g eps/C w_y
    // + g (a - (1 - eps) w_y) p, with p - 1 = expm1(z - lse) (no cancellation against the 1).
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      const Vec z = z_y[w];
      const Vec below_one = fast_expm1((z - hi[w]) - lo[w]);
      Vec d = g[w] * (target_term[w] * below_one - spread * w_y[w]) +
              (va[w] - g[w] * target_term[w]) * (below_one + one);
      if (cfg.softcap > 0) {
        const Vec th = z * inv_cap;
        d = d * (one - th * th);
      }
      acc_t target_grad[K];
      d.store(target_grad);
      const int valid = invalid[w].zero_mask();  // bit l: lane l has a class index
      for (int l = 0; l < K; ++l)
        if (valid >> l & 1) db[w * K + l + targets[w * K + l] * dcls] = static_cast<D>(target_grad[l]);
    }
  }
};

// The Transposed path's buffers: up to kVec short rows from position r0, class c of row l at
// x[c * kVec + l], with their class indices (ignore_index in the padding lanes) or
// probability targets.
template <typename scalar_t>
struct TransposedRows {
  static constexpr int64_t K = AccVec<scalar_t>::size();
  scalar_t x[kTransposedMaxClasses * K];
  scalar_t t[kTransposedMaxClasses * K];
  int64_t targets[K];
  int64_t rows;

  TransposedRows(const CrossEntropyProblem& p, const Operands<scalar_t>& ops, int64_t r0, int64_t n) : rows(n) {
    const std::array<int64_t, K> x_off = offsets(p, p.xs, r0);
    load_transposed<K>(ops.x, 1, x_off, rows, p.classes, x);
    if (p.soft) {
      load_transposed<K>(ops.probs, p.ts.cls, offsets(p, p.ts, r0), rows, p.classes, t);
    } else {
      for (int64_t l = 0; l < K; ++l) targets[l] = l < rows ? ops.targets[r0 + l] : p.ignore_index;
    }
  }

  // Element offsets of the rows' class 0 in an operand with strides s.
  std::array<int64_t, K> offsets(const CrossEntropyProblem& p, const RowStrides& s, int64_t r0) const {
    std::array<int64_t, K> off{};
    for (int64_t l = 0; l < rows; ++l) off[l] = (r0 + l) / p.inner * s.outer + (r0 + l) % p.inner * s.inner;
    return off;
  }

  LaneBlock<scalar_t> block(const CrossEntropyProblem& p, const RowContext<acc_type<scalar_t>>& ctx) const {
    return LaneBlock<scalar_t>(p, ctx, x, K, targets, p.soft ? t : nullptr, K);
  }
};

template <typename scalar_t>
void launch_forward(const CrossEntropyProblem& p, at::Tensor& loss_t, at::Tensor& lse_t, const at::Tensor& scale_t) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyConfig<acc_t> cfg = p.config<acc_t>();
  const RowContext<acc_t> ctx{cfg, p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr};
  acc_t* loss = loss_t.mutable_data_ptr<acc_t>();
  double* lse = lse_t.mutable_data_ptr<double>();
  const acc_t* scale = scale_t.defined() ? scale_t.const_data_ptr<acc_t>() : nullptr;
  // In-place: the gradient goes into the logits (x is this op's mutable input).
  scalar_t* x = scale ? p.x.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t C = p.classes;
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const Operands<scalar_t> ops(p);
  const PositionPath path = position_path<scalar_t>(p, nullptr);
  auto block = [&](int64_t r0, int64_t rows, auto wide) {
    using Block = LaneBlock<scalar_t, decltype(wide)::value>;
    if (path == PositionPath::Lanes) {
      const auto lanes = Block::in_place(p, ctx, ops, r0);
      typename Block::Lse split;
      lanes.forward(loss + r0, lse + r0, x ? &split : nullptr);
      if (!x) return;
      typename Block::Vec g[Block::kLanes / Block::K];
      for (int w = 0; w < decltype(wide)::value; ++w) g[w] = Block::Vec::loadu(scale + r0 + w * Block::K);
      lanes.gradient(g, split, x + (lanes.xb - ops.x), p.xs.cls, false);
      return;
    }
    if constexpr (decltype(wide)::value == 1) {  // the Transposed path's blocks are one vector wide
      constexpr int64_t K = Block::K;
      TransposedRows<scalar_t> buf(p, ops, r0, rows);
      const Block lanes = buf.block(p, ctx);
      acc_t block_loss[K];
      double block_lse[K];
      typename Block::Lse split;
      lanes.forward(block_loss, block_lse, &split);
      std::copy_n(block_loss, rows, loss + r0);
      std::copy_n(block_lse, rows, lse + r0);
      if (!x) return;
      const typename Block::Vec g_vec[1] = {Block::Vec::loadu(scale + r0, rows)};  // lanes from rows on: 0
      lanes.gradient(g_vec, split, buf.x, K, false);  // over the logits in the buffer, each read before written
      store_transposed<K>(buf.x, rows, C, x, 1, buf.offsets(p, p.xs, r0));
    }
  };
  for_each_position<scalar_t>(p, ops, path, [&](int64_t r, RowKind kind, int64_t y, const auto* z, const auto* t) {
    scalar_t* xr = x ? x + (r / p.inner) * p.xs.outer + (r % p.inner) * p.xs.inner : nullptr;
    if (kind != RowKind::Valid) {  // ignored: no loss, no gradient; bad (unchecked): NaN
      const acc_t value = kind == RowKind::Ignored ? acc_t(0) : nan;
      loss[r] = value;
      lse[r] = static_cast<double>(value);
      if (xr) fill_row(xr, p.xs.cls, C, value);
      return;
    }
    const auto [row_loss_value, row_lse] = row_loss(z, t, y, ctx);
    loss[r] = row_loss_value;
    lse[r] = row_lse;
    const SplitLse<acc_t> split = split_lse<acc_t>(row_lse);
    if (!xr) return;
    const acc_t x_target = t ? acc_t(0) : static_cast<acc_t>(xr[y * p.xs.cls]);
    using Z = std::remove_const_t<std::remove_pointer_t<decltype(z)>>;
    if (static_cast<const void*>(z) == static_cast<const void*>(xr)) {
      row_grad(z, t, y, x_target, scale[r], split, ctx, xr);  // element-wise in place
    } else if constexpr (std::is_same_v<Z, acc_t>) {
      acc_t* zbuf = const_cast<acc_t*>(z);  // this thread's buffer: overwrite it, then scatter
      row_grad(z, t, y, x_target, scale[r], split, ctx, zbuf);
      scatter(zbuf, C, xr, p.xs.cls);
    }
  }, block);
}

template <typename scalar_t>
void launch_backward(const CrossEntropyProblem& p, const at::Tensor& g_t, const at::Tensor& lse_t, at::Tensor& dx_t,
                     const RowStrides& ds) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyConfig<acc_t> cfg = p.config<acc_t>();
  const RowContext<acc_t> ctx{cfg, p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr};
  const acc_t* g = g_t.const_data_ptr<acc_t>();
  const double* lse = lse_t.const_data_ptr<double>();
  const Operands<scalar_t> ops(p);
  const scalar_t* x = ops.x;
  scalar_t* dx = dx_t.mutable_data_ptr<scalar_t>();
  const int64_t C = p.classes;
  // A gradient much larger than the last-level cache is written around it.
  const bool stream = dx_t.nbytes() > (int64_t(64) << 20);
  const PositionPath path = position_path<scalar_t>(p, &ds);
  auto block = [&](int64_t r0, int64_t rows, auto wide) {
    using Block = LaneBlock<scalar_t, decltype(wide)::value>;
    typename Block::Vec g_block[decltype(wide)::value];
    typename Block::Lse split;
    Block::load_saved(g + r0, lse + r0, rows, g_block, split);
    if (path == PositionPath::Lanes) {
      const int64_t o = r0 / p.inner, i0 = r0 % p.inner;
      Block::in_place(p, ctx, ops, r0).gradient(g_block, split, dx + o * ds.outer + i0, ds.cls, stream);
      return;
    }
    if constexpr (decltype(wide)::value == 1) {  // the Transposed path's blocks are one vector wide
      TransposedRows<scalar_t> buf(p, ops, r0, rows);
      buf.block(p, ctx).gradient(g_block, split, buf.x, Block::K, false);  // over the logits in the buffer
      store_transposed<Block::K>(buf.x, rows, C, dx, ds.cls, buf.offsets(p, ds, r0));
    }
  };
  for_each_position<scalar_t>(p, ops, path, [&](int64_t r, RowKind kind, int64_t y, const auto* z, const auto* t) {
    const int64_t o = r / p.inner, i = r % p.inner;
    scalar_t* dr = dx + o * ds.outer + i * ds.inner;
    if (kind != RowKind::Valid) {
      fill_row(dr, ds.cls, C, kind == RowKind::Ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN());
      return;
    }
    const acc_t x_target = t ? acc_t(0) : static_cast<acc_t>(x[o * p.xs.outer + i * p.xs.inner + y * p.xs.cls]);
    const SplitLse<acc_t> split = split_lse<acc_t>(lse[r]);
    if (ds.cls == 1) return row_grad(z, t, y, x_target, g[r], split, ctx, dr, stream);
    thread_local std::vector<acc_t> grad;
    grad.resize(C);
    row_grad(z, t, y, x_target, g[r], split, ctx, grad.data());
    scatter(grad.data(), C, dr, ds.cls);
  }, block);
}

template <typename Launch>
void dispatch_dtype(const CrossEntropyProblem& p, const Launch& launch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_cross_entropy",
                                  [&] { launch(scalar_t{}); });
}

// One sequential pass over the class indices (N * inner int64 reads), before any write.
void check_class_targets(const CrossEntropyProblem& p) {
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < p.rows(); ++r)
    if (t[r] != p.ignore_index && !target_in_range(t[r], p.classes)) raise_bad_target(p, r, t[r]);
}

void forward_kernels(const CrossEntropyProblem& p, at::Tensor& loss, at::Tensor& lse, const at::Tensor& scale) {
  dispatch_dtype(p, [&](auto tag) { launch_forward<decltype(tag)>(p, loss, lse, scale); });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing, double z_loss,
                                                         double softcap, bool check_target) {
  const auto p = make_cross_entropy_problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  return cross_entropy_forward_host(input, p, check_target, nullptr, check_class_targets, forward_kernels);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_inplace(at::Tensor& input, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& grad_scale, int64_t ignore_index,
                                                                 double label_smoothing, double z_loss, double softcap,
                                                                 bool check_target) {
  const auto p = make_cross_entropy_problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  return cross_entropy_forward_host(input, p, check_target, &grad_scale, check_class_targets, forward_kernels);
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                  double label_smoothing, double z_loss, double softcap) {
  const auto p = make_cross_entropy_problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  return cross_entropy_backward_host(
      p, input, grad_loss, lse, [](at::Tensor& dx) { advise_huge_pages(dx); },
      [&](const CrossEntropyProblem& q, const at::Tensor& g, const at::Tensor& l, at::Tensor& dx,
          const RowStrides& ds) {
        dispatch_dtype(q, [&](auto tag) { launch_backward<decltype(tag)>(q, g, l, dx, ds); });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("cross_entropy_forward_inplace", &cross_entropy_forward_inplace);
}

}  // namespace alchemy::cpu
