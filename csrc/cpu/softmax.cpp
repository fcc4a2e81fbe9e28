// CPU kernels of softmax_forward / softmax_backward: (log-)softmax(x / T) along
// one dim, one read of x for the online statistics and one write of the output.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include <alchemy/online_softmax.h>
#include <alchemy/row_layout.h>
#include <alchemy/softmax_host.h>

#include "huge_pages.h"
#include "row_stats.h"
#include "vec_math.h"

namespace alchemy::cpu {
namespace {

// A softmax row in ATen's three passes: the max, then exp(x - max) into y with its sum, then
// y / sum. One exp per element: the statistics (row_stats) followed by an
// output pass would take two, and softmax is compute-bound here up to rows of 2^18 classes
// (measured on AVX2: [64, 262144] 26.7 ms against 36.1 ms, [4096, 32000] 194 ms against 201 ms
// for keeping the online pass's exps and rescaling them). The second and third passes mostly hit
// the cache the first one filled.
template <typename in_t>
void softmax_row_three_pass(const in_t* x, acc_type<in_t>* y, int64_t C, acc_type<in_t> inv_t) {
  using acc_t = acc_type<in_t>;
  using Vec = AccVec<in_t>;
  constexpr int64_t kVec = Vec::size();
  const acc_t max = row_max(x, C);
  if (degenerate(max)) {  // max NaN or +-inf: the whole row is NaN, as in PyTorch
    std::fill(y, y + C, std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  // A NaN that running_max dropped reaches the sum through fast_exp, and every output through 1/sum.
  const Vec shift(max), vinv(inv_t);
  Vec vsum(0);
  int64_t c = 0;
  for (; c + kVec <= C; c += kVec) {
    const Vec e = fast_exp((load_acc(x + c) - shift) * vinv);
    e.store(y + c);
    vsum += e;
  }
  const int64_t tail = C - c;
  if (tail > 0) {
    const Vec e = Vec::set(Vec(0), fast_exp((load_acc(x + c, tail) - shift) * vinv), tail);
    e.store(y + c, tail);
    vsum += e;
  }
  const Vec vinv_sum(acc_t(1) / reduce_sum(vsum));
  for (c = 0; c + kVec <= C; c += kVec) (Vec::loadu(y + c) * vinv_sum).store(y + c);
  if (tail > 0) (Vec::loadu(y + c, tail) * vinv_sum).store(y + c, tail);
}

template <typename in_t, typename out_t, bool kLog>
void forward_row(const in_t* x, out_t* y, int64_t C, acc_type<in_t> inv_t) {
  using acc_t = acc_type<in_t>;
  using Vec = AccVec<in_t>;
  constexpr int64_t kVec = Vec::size();
  if constexpr (kLog) {
    // The statistics, then y = (x - max) * inv_t - log(sum): no exp in the output pass.
    const SoftmaxOutput<acc_t> k = output_constants(row_stats(x, C, inv_t));
    // A degenerate row has NaN constants, which the products below carry to every output.
    const Vec shift(k.shift), vinv(inv_t), neg_log_sum(-k.log_sum);
    int64_t c = 0;
    for (; c + kVec <= C; c += kVec) {
      const Vec d = load_acc(x + c) - shift;  // exact near the max, unlike x * inv_t - shift * inv_t
      store_acc(y + c, at::vec::fmadd(d, vinv, neg_log_sum));
    }
    if (c < C) store_acc(y + c, at::vec::fmadd(load_acc(x + c, C - c) - shift, vinv, neg_log_sum), C - c);
  } else if constexpr (std::is_same_v<out_t, acc_t>) {
    softmax_row_three_pass(x, y, C, inv_t);
  } else {
    // bf16/fp16 output: the exps go to an fp32 row (cache-resident) and are rounded once.
    thread_local std::vector<acc_t> row;
    row.resize(C);
    softmax_row_three_pass(x, row.data(), C, inv_t);
    int64_t c = 0;
    for (; c + kVec <= C; c += kVec) store_acc(y + c, Vec::loadu(row.data() + c));
    for (; c < C; ++c) y[c] = static_cast<out_t>(row[c]);
  }
}

template <typename scalar_t, bool kLog>
void backward_row(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t C,
                  acc_type<scalar_t> inv_t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  // Four independent accumulators: one would serialize on the add latency.
  constexpr int kAcc = 4;
  Vec vdot[kAcc] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  auto term = [&](int64_t at) {
    const Vec g = load_acc(dy + at);
    return kLog ? g : g * load_acc(y + at);
  };
  int64_t c = 0;
  for (; c + kAcc * kVec <= C; c += kAcc * kVec) {
    ALCHEMY_UNROLL
    for (int j = 0; j < kAcc; ++j) vdot[j] += term(c + j * kVec);
  }
  for (; c + kVec <= C; c += kVec) vdot[0] += term(c);
  const int64_t tail = C - c;  // on lanes: zeros beyond it add nothing to the dot
  if (tail > 0) {
    const Vec g = load_acc(dy + c, tail);
    vdot[1] += kLog ? g : g * load_acc(y + c, tail);
  }
  const Vec vd(reduce_sum((vdot[0] + vdot[1]) + (vdot[2] + vdot[3]))), vinv(inv_t);
  auto grad = [&](const Vec& g, const Vec& out) {
    return kLog ? (g - fast_exp(out) * vd) * vinv : out * (g - vd) * vinv;
  };
  for (c = 0; c + kVec <= C; c += kVec) store_acc(dx + c, grad(load_acc(dy + c), load_acc(y + c)));
  if (tail > 0) store_acc(dx + c, grad(load_acc(dy + c, tail), load_acc(y + c, tail)), tail);
}

// Lanes path: W * kVec adjacent rows (unit stride along `inner`) reduced together
// while looping over the classes at stride `cls`, vector w holding rows [w * kVec, (w + 1) * kVec).
// W > 1 reads whole cache lines per class: with a large power-of-two stride the classes of a
// block share cache sets, and half a line left for the next block is often evicted by then.
template <typename in_t, typename out_t, bool kLog, int W>
void forward_lanes(const in_t* x, out_t* y, int64_t C, int64_t xs, int64_t ys,
                   acc_type<in_t> inv_t) {
  using acc_t = acc_type<in_t>;
  using Vec = AccVec<in_t>;
  constexpr int64_t kVec = Vec::size();
  const Vec vinv(inv_t), zero(0), ninf(neg_inf<acc_t>());
  Vec vmax[W], vsum[W];
  ALCHEMY_UNROLL
  for (int w = 0; w < W; ++w) vmax[w] = ninf, vsum[w] = zero;
  for (int64_t c = 0; c < C; c += kVecsPerStep) {
    const int64_t n = std::min<int64_t>(kVecsPerStep, C - c);
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      const in_t* xw = x + w * kVec;
      Vec step_max = ninf;
      for (int64_t j = 0; j < n; ++j) step_max = running_max(step_max, load_acc(xw + (c + j) * xs));
      const Vec new_max = running_max(vmax[w], step_max);
      const Vec shift = Vec::blendv(new_max, zero, new_max == ninf);  // lane-wise finite_shift
      vsum[w] = vsum[w] * fast_exp((vmax[w] - shift) * vinv);
      for (int64_t j = 0; j < n; ++j) vsum[w] += fast_exp((load_acc(xw + (c + j) * xs) - shift) * vinv);
      vmax[w] = new_max;
    }
  }
  // Lane-wise output_constants: NaN for degenerate lanes (max NaN or +-inf).
  const Vec nan(std::numeric_limits<acc_t>::quiet_NaN()), inf(std::numeric_limits<acc_t>::infinity());
  Vec shift[W], log_sum[W], inv_sum[W];
  ALCHEMY_UNROLL
  for (int w = 0; w < W; ++w) {
    shift[w] = Vec::blendv(nan, vmax[w], vmax[w].abs() < inf);
    if (kLog) log_sum[w] = vsum[w].log();
    else inv_sum[w] = vsum[w].reciprocal();
  }
  for (int64_t c = 0; c < C; ++c) {
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      const Vec z = (load_acc(x + w * kVec + c * xs) - shift[w]) * vinv;
      store_acc(y + w * kVec + c * ys, kLog ? z - log_sum[w] : fast_exp(z) * inv_sum[w]);
    }
  }
}

template <typename scalar_t, bool kLog, int W>
void backward_lanes(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t C,
                    const std::array<RowStrides, 3>& s, acc_type<scalar_t> inv_t) {
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  Vec vdot[W];
  ALCHEMY_UNROLL
  for (int w = 0; w < W; ++w) vdot[w] = Vec(0);
  for (int64_t c = 0; c < C; ++c) {
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      const Vec g = load_acc(dy + w * kVec + c * s[0].cls);
      vdot[w] += kLog ? g : g * load_acc(y + w * kVec + c * s[1].cls);
    }
  }
  const Vec vinv(inv_t);
  for (int64_t c = 0; c < C; ++c) {
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      const Vec g = load_acc(dy + w * kVec + c * s[0].cls), out = load_acc(y + w * kVec + c * s[1].cls);
      store_acc(dx + w * kVec + c * s[2].cls, kLog ? (g - fast_exp(out) * vdot[w]) * vinv : out * (g - vdot[w]) * vinv);
    }
  }
}

// The lanes path in three passes, for blocks that stay in cache between them (C up to
// kLanesThreePassMaxClasses): the max, exp(x - max) with its sum (kept in y for an fp32/fp64
// softmax), then the output. One exp per element, against forward_lanes' online steps (a rescale
// exp per step, and for softmax the exps again in the output pass). x and y may be the same
// buffer: each pass reads class c of x before it writes class c of y.
constexpr int64_t kLanesThreePassMaxClasses = 2048;

template <typename in_t, typename out_t, bool kLog, int W>
void forward_lanes_three_pass(const in_t* x, out_t* y, int64_t C, int64_t xs, int64_t ys, acc_type<in_t> inv_t) {
  using acc_t = acc_type<in_t>;
  using Vec = AccVec<in_t>;
  constexpr int64_t kVec = Vec::size();
  constexpr bool kKeepExp = !kLog && std::is_same_v<out_t, acc_t>;
  const Vec vinv(inv_t), inf(std::numeric_limits<acc_t>::infinity()), nan(std::numeric_limits<acc_t>::quiet_NaN());
  Vec shift[W], vsum[W];
  ALCHEMY_UNROLL
  for (int w = 0; w < W; ++w) shift[w] = Vec(-std::numeric_limits<acc_t>::infinity()), vsum[w] = Vec(0);
  for (int64_t c = 0; c < C; ++c) {
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) shift[w] = running_max(shift[w], load_acc(x + w * kVec + c * xs));
  }
  // Lane-wise output_constants: NaN for degenerate lanes (max NaN or +-inf).
  ALCHEMY_UNROLL
  for (int w = 0; w < W; ++w) shift[w] = Vec::blendv(nan, shift[w], shift[w].abs() < inf);
  for (int64_t c = 0; c < C; ++c) {
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      const Vec e = fast_exp((load_acc(x + w * kVec + c * xs) - shift[w]) * vinv);
      vsum[w] += e;
      if constexpr (kKeepExp) e.store(y + w * kVec + c * ys);
    }
  }
  Vec out_const[W];  // log_sum for log-softmax, inv_sum for softmax
  ALCHEMY_UNROLL
  for (int w = 0; w < W; ++w) out_const[w] = kLog ? vsum[w].log() : vsum[w].reciprocal();
  for (int64_t c = 0; c < C; ++c) {
    ALCHEMY_UNROLL
    for (int w = 0; w < W; ++w) {
      out_t* yc = y + w * kVec + c * ys;
      if constexpr (kKeepExp) {
        (Vec::loadu(yc) * out_const[w]).store(yc);
      } else {
        const Vec z = (load_acc(x + w * kVec + c * xs) - shift[w]) * vinv;
        store_acc(yc, kLog ? z - out_const[w] : fast_exp(z) * out_const[w]);
      }
    }
  }
}

// One row at any stride: the scalar remainder of the lanes path.
template <typename in_t, typename out_t, bool kLog>
void forward_strided(const in_t* x, out_t* y, int64_t C, int64_t xs, int64_t ys,
                     acc_type<in_t> inv_t) {
  using acc_t = acc_type<in_t>;
  SoftmaxStats<acc_t> stats = empty_stats<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v[1] = {static_cast<acc_t>(x[c * xs])};
    stats = accumulate(stats, v, inv_t);
  }
  const SoftmaxOutput<acc_t> k = output_constants(stats);
  for (int64_t c = 0; c < C; ++c)
    y[c * ys] = static_cast<out_t>(softmax_output<kLog>(static_cast<acc_t>(x[c * xs]), k, inv_t));
}

template <typename scalar_t, bool kLog>
void backward_strided(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t C,
                      const std::array<RowStrides, 3>& s, acc_type<scalar_t> inv_t) {
  using acc_t = acc_type<scalar_t>;
  acc_t dot = 0;
  for (int64_t c = 0; c < C; ++c)
    dot += grad_dot_term<kLog>(static_cast<acc_t>(dy[c * s[0].cls]), static_cast<acc_t>(y[c * s[1].cls]));
  for (int64_t c = 0; c < C; ++c)
    dx[c * s[2].cls] = static_cast<scalar_t>(softmax_grad<kLog>(
        static_cast<acc_t>(dy[c * s[0].cls]), static_cast<acc_t>(y[c * s[1].cls]), dot, inv_t));
}

// Forward on the Rows path with rows this short: kVec rows at a time are copied transposed
// into a buffer, one row per vector lane, and run through the lanes kernel. A short row would
// otherwise pay horizontal reductions and a scalar tail (C % kVec exps) each. Measured here
// (benchmarks/short_rows.py): faster than the rows kernel up to C = 21, slower at 100; the
// backward (no exp for softmax, one for log) stays on the rows kernel, faster even at C = 2.
constexpr int64_t kTransposedMaxClasses = 32;

// A block of up to kVec rows of a Rows plan: the element offset of row l in operand k
// is off[k][l]; lanes [rows, kVec) are padding.
template <size_t N, int64_t kVec>
struct RowBlock {
  std::array<std::array<int64_t, kVec>, N> off;
  int64_t rows;
};

// Runs block(RowBlock) over the rows of a Rows plan in blocks of kVec, in parallel.
template <size_t N, int64_t kVec, typename BlockFn>
void for_each_row_block(const RowPlan<N>& plan, const BlockFn& block) {
  const RowGeometry& g = plan.geometry;
  const int64_t blocks = (g.rows() + kVec - 1) / kVec;
  at::parallel_for(0, blocks, task_grain(blocks, g.classes * kVec), [&](int64_t begin, int64_t end) {
    RowBlock<N, kVec> b;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = i * kVec;
      b.rows = std::min(kVec, g.rows() - r0);
      for (int64_t l = 0; l < b.rows; ++l) {
        // inner == 1 (rows along the last dim) spares two 64-bit divisions per row.
        const int64_t r = r0 + l, o = g.inner == 1 ? r : r / g.inner, in = g.inner == 1 ? 0 : r % g.inner;
        for (size_t k = 0; k < N; ++k) b.off[k][l] = o * plan.strides[k].outer + in * plan.strides[k].inner;
      }
      block(b);
    }
  });
}

// Vectors of rows per block of the Lanes path. A block's class rows lie a whole `inner` apart:
// short runs (4 vectors, 128 bytes for fp32) at that stride fall into the same few cache sets and
// are evicted between a block's passes once there are many classes; longer runs stream.
// Measured on [8, C, 64, 64] fp32 (AVX2): forward 4 wide is faster up to C = 21, 16 wide at
// C = 100 (0.92x of torch against 1.04x); backward (loads and fmas only) 32 wide, 1.00x of torch
// at C = 21 and 1.03x at C = 100 against 1.65x and 1.85x 4 wide.
constexpr int kLanesWide = 4, kWideLanes = 16, kBackwardLanesWide = 32;
constexpr int64_t kWideLanesMinClasses = 64;

// Runs `row(offsets...)` over every row of the plan, in parallel. For the Lanes
// path `lanes(offsets..., w)` handles w * kVec adjacent rows, w = kWide or 1
// (std::integral_constant), and `row` the remainder.
template <size_t N, int64_t kVec, int kWide, typename RowFn, typename LanesFn>
void for_each_row(const RowPlan<N>& plan, const RowFn& row, const LanesFn& lanes) {
  const RowGeometry& g = plan.geometry;
  auto offsets = [&](int64_t o, int64_t i) {
    std::array<int64_t, N> off;
    for (size_t k = 0; k < N; ++k) off[k] = o * plan.strides[k].outer + i * plan.strides[k].inner;
    return off;
  };
  const int64_t work_per_row = std::max<int64_t>(g.classes, 1);
  if (plan.path == RowPath::Rows) {
    at::parallel_for(0, g.rows(), task_grain(g.rows(), work_per_row), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row(g.inner == 1 ? offsets(r, 0) : offsets(r / g.inner, r % g.inner));
    });
    return;
  }
  constexpr int64_t kSpan = kWide * kVec;
  const int64_t blocks = (g.inner + kSpan - 1) / kSpan, tasks = g.outer * blocks;
  at::parallel_for(0, tasks, task_grain(tasks, work_per_row * kSpan), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / blocks;
      int64_t i = (t % blocks) * kSpan;
      if (i + kSpan <= g.inner) {
        lanes(offsets(o, i), std::integral_constant<int, kWide>{});
        continue;
      }
      for (; i + kVec <= g.inner; i += kVec) lanes(offsets(o, i), std::integral_constant<int, 1>{});
      for (; i < g.inner; ++i) row(offsets(o, i));
    }
  });
}

template <typename in_t, typename out_t>
void launch_forward(const RowPlan<2>& plan, const at::Tensor& x, at::Tensor& y, bool log, double inv_temperature) {
  using acc_t = acc_type<in_t>;
  constexpr int64_t kVec = AccVec<in_t>::size();
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* yp = y.mutable_data_ptr<out_t>();
  const int64_t C = plan.geometry.classes;
  const int64_t xs = plan.strides[0].cls, ys = plan.strides[1].cls;
  const auto inv_t = static_cast<acc_t>(inv_temperature);
  auto run = [&](auto log_tag) {
    constexpr bool kLog = decltype(log_tag)::value;
    if (plan.path == RowPath::Rows && C <= kTransposedMaxClasses) {
      for_each_row_block<2, kVec>(plan, [&](const RowBlock<2, kVec>& b) {
        alignas(64) acc_t buf[kTransposedMaxClasses * kVec];
        load_transposed<kVec>(xp, 1, b.off[0], b.rows, C, buf);
        forward_lanes_three_pass<acc_t, acc_t, kLog, 1>(buf, buf, C, kVec, kVec, inv_t);
        store_transposed<kVec>(buf, b.rows, C, yp, 1, b.off[1]);
      });
      return;
    }
    auto row = [&](const std::array<int64_t, 2>& off) {
      if (plan.path == RowPath::Rows)
        forward_row<in_t, out_t, kLog>(xp + off[0], yp + off[1], C, inv_t);
      else
        forward_strided<in_t, out_t, kLog>(xp + off[0], yp + off[1], C, xs, ys, inv_t);
    };
    auto lanes = [&](const std::array<int64_t, 2>& off, auto wide) {
      constexpr int W = decltype(wide)::value;
      if (C <= kLanesThreePassMaxClasses)
        forward_lanes_three_pass<in_t, out_t, kLog, W>(xp + off[0], yp + off[1], C, xs, ys, inv_t);
      else
        forward_lanes<in_t, out_t, kLog, W>(xp + off[0], yp + off[1], C, xs, ys, inv_t);
    };
    if (C < kWideLanesMinClasses)
      for_each_row<2, kVec, kLanesWide>(plan, row, lanes);
    else
      for_each_row<2, kVec, kWideLanes>(plan, row, lanes);
  };
  log ? run(std::true_type{}) : run(std::false_type{});
}

template <typename scalar_t>
void launch_backward(const RowPlan<3>& plan, const at::Tensor& dy, const at::Tensor& y, at::Tensor& dx, bool log,
                     double inv_temperature) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kVec = AccVec<scalar_t>::size();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const int64_t C = plan.geometry.classes;
  const auto inv_t = static_cast<acc_t>(inv_temperature);
  auto run = [&](auto log_tag) {
    constexpr bool kLog = decltype(log_tag)::value;
    for_each_row<3, kVec, kBackwardLanesWide>(
        plan,
        [&](const std::array<int64_t, 3>& off) {
          if (plan.path == RowPath::Rows)
            backward_row<scalar_t, kLog>(dyp + off[0], yp + off[1], dxp + off[2], C, inv_t);
          else
            backward_strided<scalar_t, kLog>(dyp + off[0], yp + off[1], dxp + off[2], C, plan.strides, inv_t);
        },
        [&](const std::array<int64_t, 3>& off, auto wide) {
          backward_lanes<scalar_t, kLog, decltype(wide)::value>(dyp + off[0], yp + off[1], dxp + off[2], C,
                                                                plan.strides, inv_t);
        });
  };
  log ? run(std::true_type{}) : run(std::false_type{});
}

void advise_output(at::Tensor& out) { advise_huge_pages(out); }

at::Tensor softmax_forward(const at::Tensor& input, int64_t dim, double temperature, bool log,
                           std::optional<at::ScalarType> dtype) {
  return softmax_forward_host(input, dim, temperature, dtype, plan_rows<2>, advise_output,
                              [&](const RowPlan<2>& plan, const at::Tensor& x, at::Tensor& y, double inv_t,
                                  auto in_tag, auto out_tag) {
                                launch_forward<decltype(in_tag), decltype(out_tag)>(plan, x, y, log, inv_t);
                              });
}

at::Tensor softmax_backward(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                            double temperature, bool log) {
  return softmax_backward_host(grad_output, output, dim, temperature, plan_rows<3>, advise_output,
                               [&](const RowPlan<3>& plan, const at::Tensor& dy, const at::Tensor& y, at::Tensor& dx,
                                   double inv_t, auto tag, auto) {
                                 launch_backward<decltype(tag)>(plan, dy, y, dx, log, inv_t);
                               });
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CPU, m) {
  m.impl("softmax_forward", &softmax_forward);
  m.impl("softmax_backward", &softmax_backward);
}

}  // namespace alchemy::cpu
