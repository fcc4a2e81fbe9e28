// cross_entropy_loss / triton_cross_entropy_loss: the whole F.cross_entropy (forward, reduction,
// autograd) in one operator call, so that a small loss costs no more than PyTorch's own.
//
// The per-position kernels (cross_entropy_forward / _backward, or their triton_ twins) are called
// through the dispatcher, so one body serves both backends and every device. The autograd formula
// is a C++ node (Autograd key): no Python runs per call. torch.compile traces through it like any
// C++ autograd kernel, with the fake kernels of alchemy_ops/_ops.py.
//
// z-loss reduction (as Liger-Kernel, and PaLM's per-token definition): with reduction "mean" the
// z term is divided by the number of non-ignored positions n while the cross-entropy is divided by
// the summed class weights W. The kernels add z * lse^2 to each position's loss, and the mean scales
// every position by 1/W, so they run with z_k = z * W / n: sum_r (w ce_r + z_k lse_r^2) / W
// = sum_r w ce_r / W + z sum_r lse_r^2 / n, in forward and backward alike.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace alchemy {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };  // at::Reduction's values

using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, int64_t, double, double,
                                                     double, bool);
using BackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double, double, double);

// The per-position operators of one backend, looked up once.
struct PositionOps {
  c10::TypedOperatorHandle<ForwardFn> forward;
  c10::TypedOperatorHandle<BackwardFn> backward;
};

template <bool kTriton>
const PositionOps& position_ops() {
  static const PositionOps ops{
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kTriton ? "alchemy_ops::triton_cross_entropy_forward" : "alchemy_ops::cross_entropy_forward",
                             "")
          .typed<ForwardFn>(),
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(
              kTriton ? "alchemy_ops::triton_cross_entropy_backward" : "alchemy_ops::cross_entropy_backward", "")
          .typed<BackwardFn>(),
  };
  return ops;
}

at::ScalarType acc_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> positions_shape(const at::Tensor& input) {
  std::vector<int64_t> shape = input.sizes().vec();
  if (!shape.empty()) shape.erase(shape.begin() + (input.dim() > 1 ? 1 : 0));
  return shape;
}

// (W, n): the mean's denominator (summed weight of the non-ignored class indices, their count
// without weight, the number of positions for probability targets) and the non-ignored count.
// A CPU loop (no tensor ops: this is most of a small loss's cost), or ATen ops on other devices.
std::array<double, 2> host_denominators(const at::Tensor& input, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  const int64_t classes = input.dim() > 1 ? input.size(1) : input.size(0);
  if (at::isFloatingType(target.scalar_type())) {
    const double positions = static_cast<double>(target.numel() / std::max<int64_t>(classes, 1));
    return {positions, positions};
  }
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "alchemy_ops: class-index target must be int64, got ",
                   target.scalar_type(), "; cast with .long()");
  const at::Tensor t = target.contiguous();
  const int64_t* ts = t.const_data_ptr<int64_t>();
  at::Tensor w;
  const double* ws = nullptr;
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK_VALUE(weight->numel() == classes, "alchemy_ops: weight must have ", classes, " values, got ",
                      weight->numel());
    w = weight->to(at::kDouble).contiguous();
    ws = w.const_data_ptr<double>();
  }
  using Sums = std::array<double, 2>;
  return at::parallel_reduce(
      0, t.numel(), 32768, Sums{0, 0},
      [&](int64_t begin, int64_t end, Sums sums) {
        for (int64_t r = begin; r < end; ++r) {
          if (ts[r] == ignore_index) continue;
          // An out-of-range index (unchecked) is clamped here only to stay in bounds; its loss is NaN.
          sums[0] += ws ? ws[std::min(std::max<int64_t>(ts[r], 0), classes - 1)] : 1.0;
          sums[1] += 1.0;
        }
        return sums;
      },
      [](Sums a, Sums b) { return Sums{a[0] + b[0], a[1] + b[1]}; });
}

// The same as a tensor [2] on the target's device, without a host sync.
at::Tensor device_denominators(const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  const auto f64 = target.options().dtype(at::kDouble);
  const int64_t classes = input.dim() > 1 ? input.size(1) : input.size(0);
  if (at::isFloatingType(target.scalar_type())) {
    const double positions = static_cast<double>(target.numel() / std::max<int64_t>(classes, 1));
    return at::full({2}, positions, f64);
  }
  const at::Tensor valid = target.ne(ignore_index);
  const at::Tensor count = valid.sum(at::kDouble);
  at::Tensor total = count;
  if (weight.has_value() && weight->defined()) {
    const at::Tensor index = target.masked_fill(valid.logical_not(), 0).clamp(0, classes - 1);
    total = weight->to(at::kDouble).index_select(0, index.reshape({-1})).reshape(index.sizes())
                .masked_fill(valid.logical_not(), 0)
                .sum();
  }
  return at::stack({total, count});
}

// z_k of the file comment: the z-loss the kernels run with. Reads W / n on the host, which only a
// weighted mean with z-loss needs (inside an operator, so torch.compile never sees the read).
double kernel_z_loss(double z_loss, int64_t reduction, const std::optional<at::Tensor>& weight,
                     const at::Tensor& denominators) {
  if (reduction != kMean || !weight.has_value() || !weight->defined() || z_loss == 0) return z_loss;
  const at::Tensor d = denominators.cpu();
  return z_loss * d.const_data_ptr<double>()[0] / d.const_data_ptr<double>()[1];
}

double position_loss_sum(const at::Tensor& loss) {
  return AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "alchemy_loss_sum", [&] {
    const scalar_t* l = loss.const_data_ptr<scalar_t>();
    // Fixed chunks and a fixed combine order: the same sum every run with the same thread count.
    return at::parallel_reduce(
        0, loss.numel(), 32768, 0.0,
        [&](int64_t begin, int64_t end, double sum) {
          for (int64_t r = begin; r < end; ++r) sum += static_cast<double>(l[r]);
          return sum;
        },
        [](double a, double b) { return a + b; });
  });
}

// The forward kernel of cross_entropy_loss: (loss, lse, denominators). loss is reduced (or per
// position for "none") in the accumulation dtype; lse per position in fp64, as the per-position
// op returns it; denominators fp64 [2] = (W, n) as above, which backward divides by.
template <bool kTriton>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_loss(const at::Tensor& input, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  int64_t reduction, int64_t ignore_index,
                                                                  double label_smoothing, double z_loss, double softcap,
                                                                  bool check_target) {
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum,
                    "alchemy_ops: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), "alchemy_ops: cross_entropy input must be floating-point, got ",
                   input.scalar_type(), "; cast with .float()");
  TORCH_CHECK_VALUE(input.dim() >= 1, "alchemy_ops: cross_entropy input must have a class dim");
  const auto& ops = position_ops<kTriton>();
  const at::ScalarType acc = acc_dtype(input);
  const bool on_cpu = input.device().is_cpu();
  at::Tensor denominators;
  if (on_cpu) {
    const std::array<double, 2> d = host_denominators(input, target, weight, ignore_index);
    denominators = at::empty({2}, input.options().dtype(at::kDouble));
    std::copy(d.begin(), d.end(), denominators.mutable_data_ptr<double>());
  } else {
    denominators = device_denominators(input, target, weight, ignore_index);
  }
  const double z_k = kernel_z_loss(z_loss, reduction, weight, denominators);
  auto [loss, lse] = ops.forward.call(input, target, weight, ignore_index, label_smoothing, z_k, softcap, check_target);
  if (reduction == kNone) return {loss, lse, denominators};
  if (on_cpu) {
    double total = position_loss_sum(loss);
    if (reduction == kMean) total /= denominators.const_data_ptr<double>()[0];
    return {at::scalar_tensor(total, input.options().dtype(acc)), lse, denominators};
  }
  at::Tensor total = loss.sum();
  if (reduction == kMean) total = total.div(denominators[0].to(acc));
  return {total, lse, denominators};
}

// The backward kernel of cross_entropy_loss: d loss / d input for the reduced loss's gradient.
// An operator of its own so that the host read of W / n (weighted mean with z-loss) happens inside
// it, where torch.compile sees only its fake kernel.
template <bool kTriton>
at::Tensor cross_entropy_loss_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                       const at::Tensor& denominators, int64_t reduction, int64_t ignore_index,
                                       double label_smoothing, double z_loss, double softcap) {
  const at::ScalarType acc = acc_dtype(input);
  at::Tensor grad_positions;
  if (reduction == kNone) {
    grad_positions = grad;
  } else if (input.device().is_cpu()) {  // the scalar on the host: one fill instead of five tensor ops
    double g = grad.item<double>();
    if (reduction == kMean) g /= denominators.const_data_ptr<double>()[0];
    grad_positions = at::full({lse.numel()}, g, input.options().dtype(acc));
  } else {
    at::Tensor g = grad.to(acc);
    if (reduction == kMean) g = g / denominators[0].to(acc);
    grad_positions = g.expand(positions_shape(input));
  }
  return position_ops<kTriton>().backward.call(grad_positions, input, target, weight, lse, ignore_index,
                                               label_smoothing, kernel_z_loss(z_loss, reduction, weight, denominators),
                                               softcap);
}

// d loss / d probability target: (1 - eps) w_c (lse - z_c) per position, scaled by its gradient.
at::Tensor prob_target_grad(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& lse,
                            const at::Tensor& grad_positions, double label_smoothing, double softcap,
                            at::ScalarType target_dtype) {
  const int64_t cls = input.dim() > 1 ? 1 : 0;
  at::Tensor z = input.to(acc_dtype(input));
  if (softcap > 0) z = at::tanh(z / softcap) * softcap;
  at::Tensor grad = (lse.to(z.scalar_type()).unsqueeze(cls) - z) * (grad_positions.unsqueeze(cls) * (1 - label_smoothing));
  if (weight.defined()) {
    std::vector<int64_t> shape(input.dim() - cls, 1);
    shape[0] = -1;
    grad = grad * weight.to(z.scalar_type()).view(shape);
  }
  return grad.to(target_dtype);
}

template <bool kTriton>
const c10::TypedOperatorHandle<decltype(cross_entropy_loss<kTriton>)>& loss_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kTriton ? "alchemy_ops::triton_cross_entropy_loss" : "alchemy_ops::cross_entropy_loss", "")
          .typed<decltype(cross_entropy_loss<kTriton>)>();
  return op;
}

template <bool kTriton>
struct CrossEntropyLossFunction : public torch::autograd::Function<CrossEntropyLossFunction<kTriton>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                               double label_smoothing, double z_loss, double softcap, bool check_target) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, denominators] = loss_op<kTriton>().call(input, target, weight, reduction, ignore_index,
                                                             label_smoothing, z_loss, softcap, check_target);
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), lse, denominators});
    // One saved_data entry, not five: each is a string-keyed hash insert, a measurable share of
    // a small loss's per-call cost.
    ctx->saved_data["options"] = std::make_tuple(reduction, ignore_index, label_smoothing, z_loss, softcap);
    ctx->mark_non_differentiable({lse, denominators});
    ctx->set_materialize_grads(false);  // lse and denominators never get a gradient: no zeros for them
    return {loss, lse, denominators};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    if (!grads[0].defined()) return out;  // the loss was not used
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &target = saved[1], &weight = saved[2], &lse = saved[3],
                     &denominators = saved[4];
    const auto options = ctx->saved_data["options"].toTuple();
    const int64_t reduction = options->elements()[0].toInt(), ignore_index = options->elements()[1].toInt();
    const double label_smoothing = options->elements()[2].toDouble(), z_loss = options->elements()[3].toDouble(),
                 softcap = options->elements()[4].toDouble();
    static const auto backward_op = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow(kTriton ? "alchemy_ops::triton_cross_entropy_loss_backward"
                                                                   : "alchemy_ops::cross_entropy_loss_backward",
                                                           "")
                                        .typed<decltype(cross_entropy_loss_backward<kTriton>)>();
    if (ctx->needs_input_grad(0)) {
      // Without create_graph nothing below needs recording: skip the Autograd key (the operator's
      // fallback kernel and the per-position op's, a share of a small loss's backward).
      std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
      if (!at::GradMode::is_enabled()) below_autograd.emplace();
      out[0] = backward_op.call(grads[0], input, target, weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt,
                                lse, denominators, reduction, ignore_index, label_smoothing, z_loss, softcap);
    }
    if (ctx->needs_input_grad(1)) {  // a probability target that requires grad
      const at::ScalarType acc = acc_dtype(input);
      at::Tensor g = grads[0].to(acc);
      if (reduction == kMean) g = g / denominators[0].to(acc);
      const at::Tensor grad_positions = reduction == kNone ? g : g.expand(positions_shape(input));
      out[1] = prob_target_grad(input, weight, lse, grad_positions, label_smoothing, softcap, target.scalar_type());
    }
    return out;
  }
};

template <bool kTriton>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_loss_autograd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, bool check_target) {
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || target.requires_grad())) {
    // Nothing to record (evaluation, no_grad): no node, no saved tensors.
    at::AutoDispatchBelowADInplaceOrView guard;
    return loss_op<kTriton>().call(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                                   check_target);
  }
  variable_list out = CrossEntropyLossFunction<kTriton>::apply(input, target, weight, reduction, ignore_index,
                                                               label_smoothing, z_loss, softcap, check_target);
  return {out[0], out[1], out[2]};
}

}  // namespace

// One body for both backends and both devices: the per-position kernels are found through the
// dispatcher (the triton_ ones are registered from Python for CPU and CUDA tensors).
TORCH_LIBRARY_IMPL(alchemy_ops, CPU, m) {
  m.impl("cross_entropy_loss", &cross_entropy_loss<false>);
  m.impl("triton_cross_entropy_loss", &cross_entropy_loss<true>);
  m.impl("cross_entropy_loss_backward", &cross_entropy_loss_backward<false>);
  m.impl("triton_cross_entropy_loss_backward", &cross_entropy_loss_backward<true>);
}

TORCH_LIBRARY_IMPL(alchemy_ops, CUDA, m) {
  m.impl("cross_entropy_loss", &cross_entropy_loss<false>);
  m.impl("triton_cross_entropy_loss", &cross_entropy_loss<true>);
  m.impl("cross_entropy_loss_backward", &cross_entropy_loss_backward<false>);
  m.impl("triton_cross_entropy_loss_backward", &cross_entropy_loss_backward<true>);
}

TORCH_LIBRARY_IMPL(alchemy_ops, Autograd, m) {
  m.impl("cross_entropy_loss", &cross_entropy_loss_autograd<false>);
  m.impl("triton_cross_entropy_loss", &cross_entropy_loss_autograd<true>);
}

}  // namespace alchemy
