// cross_entropy_loss / triton_cross_entropy_loss: the whole F.cross_entropy (forward, reduction,
// autograd) in one operator call, so that a small loss costs no more than PyTorch's own.
//
// The per-position kernels (cross_entropy_forward / _backward, or their triton_ twins) are called
// through the dispatcher, so one body serves both backends and every device. The autograd formula
// is a hand-written C++ node (Autograd key, node_support.h): no Python runs per call. torch.compile traces through it like any
// C++ autograd kernel, with the fake kernels of alchemy_ops/_ops.py.
//
// z-loss reduction (as Liger-Kernel, and PaLM's per-token definition): with reduction "mean" the
// z term is divided by the number of non-ignored positions n while the cross-entropy is divided by
// the summed class weights W. The kernels add z * lse^2 to each position's loss, and the mean scales
// every position by 1/W, so they run with z_k = z * W / n: sum_r (w ce_r + z_k lse_r^2) / W
// = sum_r w ce_r / W + z sum_r lse_r^2 / n, in forward and backward alike.
#include "node_support.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace alchemy {
namespace {

using torch::autograd::variable_list;
using torch::dynamo::autograd::IValuePacker;
using torch::dynamo::autograd::PackedArgs;

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

// The host pass over the class-index targets: W and n (below), and whether any index is bad.
struct HostDenominators {
  double weight_sum = 0;  // W: the mean's denominator
  double count = 0;       // n: the non-ignored positions
  bool any_bad = false;   // an index neither ignore_index nor in [0, C)
};

// (W, n): the mean's denominator (summed weight of the non-ignored class indices, their count
// without weight, the number of positions for probability targets) and the non-ignored count.
// One branch-free CPU loop (no tensor ops: this is most of a small loss's cost, and the target
// check rides along, so the kernel need not read the targets again to check them).
HostDenominators host_denominators(const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  const int64_t classes = input.dim() > 1 ? input.size(1) : input.size(0);
  if (at::isFloatingType(target.scalar_type())) {
    const double positions = static_cast<double>(target.numel() / std::max<int64_t>(classes, 1));
    return {positions, positions, false};
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
  struct Sums {
    double weight = 0;
    int64_t count = 0;
    bool any_bad = false;
  };
  const Sums sums = at::parallel_reduce(
      0, t.numel(), 32768, Sums{},
      [&](int64_t begin, int64_t end, Sums s) {
        int64_t count = 0, bad = 0;
        for (int64_t r = begin; r < end; ++r) {  // vectorized by the compiler: no branch, no float
          const int64_t counted = ts[r] != ignore_index;
          count += counted;
          bad |= counted & static_cast<int64_t>(static_cast<uint64_t>(ts[r]) >= static_cast<uint64_t>(classes));
        }
        s.count += count;
        s.any_bad |= bad != 0;
        if (!ws) return s;
        constexpr int kLanes = 8;  // independent partial sums: the adds need not wait for each other
        double part[kLanes] = {};
        for (int64_t r = begin; r < end; ++r) {
          // A bad index reads class 0's weight only to stay in bounds; its loss is NaN (or it raises).
          const bool in_range = static_cast<uint64_t>(ts[r]) < static_cast<uint64_t>(classes);
          part[r % kLanes] += ts[r] != ignore_index ? ws[in_range ? ts[r] : 0] : 0.0;
        }
        for (const double p : part) s.weight += p;
        return s;
      },
      [](Sums a, const Sums& b) { return Sums{a.weight + b.weight, a.count + b.count, a.any_bad || b.any_bad}; });
  const double count = static_cast<double>(sums.count);
  return {ws ? sums.weight : count, count, sums.any_bad};
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
    // Eight partial sums per chunk, so that the adds need not wait for each other.
    return at::parallel_reduce(
        0, loss.numel(), 32768, 0.0,
        [&](int64_t begin, int64_t end, double sum) {
          constexpr int kLanes = 8;
          double part[kLanes] = {};
          int64_t r = begin;
          for (; r + kLanes <= end; r += kLanes)
            for (int j = 0; j < kLanes; ++j) part[j] += static_cast<double>(l[r + j]);
          for (; r < end; ++r) sum += static_cast<double>(l[r]);
          for (const double p : part) sum += p;
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
    const HostDenominators d = host_denominators(input, target, weight, ignore_index);
    denominators = at::empty({2}, input.options().dtype(at::kDouble));
    denominators.mutable_data_ptr<double>()[0] = d.weight_sum;
    denominators.mutable_data_ptr<double>()[1] = d.count;
    check_target = check_target && d.any_bad;  // then the kernel's check raises, with its message
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
const c10::TypedOperatorHandle<decltype(cross_entropy_loss_backward<kTriton>)>& loss_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(kTriton ? "alchemy_ops::triton_cross_entropy_loss_backward"
                                                        : "alchemy_ops::cross_entropy_loss_backward",
                                                "")
                             .typed<decltype(cross_entropy_loss_backward<kTriton>)>();
  return op;
}

// The backward formula, shared by the node and compiled autograd's functional call: the
// gradients of input and (a probability) target.
template <bool kTriton>
variable_list cross_entropy_loss_grads(const variable_list& grads, std::array<bool, 2> needs_input_grad,
                                       const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                       const at::Tensor& denominators, int64_t reduction, int64_t ignore_index,
                                       double label_smoothing, double z_loss, double softcap) {
  variable_list out(2);
  if (!grads[0].defined()) return out;  // the loss was not used
  if (needs_input_grad[0]) {
    // Without create_graph nothing below needs recording: skip the Autograd key (the operator's
    // fallback kernel and the per-position op's, a share of a small loss's backward).
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    out[0] = loss_backward_op<kTriton>().call(grads[0], input, target, weight, lse, denominators, reduction,
                                              ignore_index, label_smoothing, z_loss, softcap);
  }
  if (needs_input_grad[1]) {  // a probability target that requires grad
    const at::ScalarType acc = acc_dtype(input);
    at::Tensor g = grads[0].to(acc);
    if (reduction == kMean) g = g / denominators[0].to(acc);
    const at::Tensor grad_positions = reduction == kNone ? g : g.expand(positions_shape(input));
    out[1] = prob_target_grad(input, weight.value_or(at::Tensor()), lse, grad_positions, label_smoothing, softcap,
                              target.scalar_type());
  }
  return out;
}

template <bool kTriton>
variable_list cross_entropy_loss_grads_packed(const variable_list& grads, const std::vector<c10::IValue>& args) {
  PackedArgs packed(args);
  // Two bools, not std::array<bool, 2>, whose unpacking in PyTorch's header warns.
  const auto needs_input_grad = packed.unpack<bool>();
  const auto needs_target_grad = packed.unpack<bool>();
  const auto input = packed.unpack<at::Tensor>();
  const auto target = packed.unpack<at::Tensor>();
  const auto weight = packed.unpack<std::optional<at::Tensor>>();
  const auto lse = packed.unpack<at::Tensor>();
  const auto denominators = packed.unpack<at::Tensor>();
  const auto reduction = packed.unpack<int64_t>();
  const auto ignore_index = packed.unpack<int64_t>();
  const auto label_smoothing = packed.unpack<double>();
  const auto z_loss = packed.unpack<double>();
  const auto softcap = packed.unpack<double>();
  return cross_entropy_loss_grads<kTriton>(grads, {needs_input_grad, needs_target_grad}, input, target, weight, lse, denominators, reduction,
                                           ignore_index, label_smoothing, z_loss, softcap);
}

// The node of the loss output (lse and denominators are not differentiable); its edges are
// (input, target). The class weights get no gradient, as in PyTorch.
template <bool kTriton>
struct CrossEntropyLossBackward final : torch::autograd::Node {
  torch::autograd::SavedVariable input_, target_, weight_, lse_, denominators_;
  int64_t reduction_ = kMean, ignore_index_ = -100;
  double label_smoothing_ = 0, z_loss_ = 0, softcap_ = 0;

  std::string name() const override {
    return kTriton ? "AlchemyTritonCrossEntropyLossBackward" : "AlchemyCrossEntropyLossBackward";
  }

  std::optional<at::Tensor> weight() const {
    at::Tensor w = weight_.unpack();
    return w.defined() ? std::optional<at::Tensor>(std::move(w)) : std::nullopt;
  }

  variable_list apply(variable_list&& grads) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    return cross_entropy_loss_grads<kTriton>(
        grads, {task_should_compute_output(0), task_should_compute_output(1)}, input_.unpack(), target_.unpack(),
        weight(), lse_.unpack(), denominators_.unpack(), reduction_, ignore_index_, label_smoothing_, z_loss_,
        softcap_);
  }

  void release_variables() override {
    input_.reset_data();
    target_.reset_data();
    weight_.reset_data();
    lse_.reset_data();
    denominators_.reset_data();
  }

  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    args.collect(input_, false);
    args.collect(target_, false);
    args.collect(weight_, false);
    args.collect(lse_, false);
    args.collect(denominators_, false);
    args.collect(reduction_);
    args.collect(ignore_index_);
    args.collect(label_smoothing_);
    args.collect(z_loss_);
    args.collect(softcap_);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::autograd::SwapSavedVariables& saved) override {
    saved.before(input_);
    saved.before(target_);
    saved.before(weight_);
    saved.before(lse_);
    saved.before(denominators_);
    PackedArgs args;
    args.pack(task_should_compute_output(0));
    args.pack(task_should_compute_output(1));
    args.pack(input_.unpack());
    args.pack(target_.unpack());
    args.pack(weight());
    args.pack(lse_.unpack());
    args.pack(denominators_.unpack());
    args.pack(reduction_);
    args.pack(ignore_index_);
    args.pack(label_smoothing_);
    args.pack(z_loss_);
    args.pack(softcap_);
    variable_list result = compiled_autograd_call(
        *this, cross_entropy_loss_grads_packed<kTriton>,
        {IValuePacker<bool>::packed_type(), IValuePacker<bool>::packed_type(), IValuePacker<at::Tensor>::packed_type(),
         IValuePacker<at::Tensor>::packed_type(), IValuePacker<std::optional<at::Tensor>>::packed_type(),
         IValuePacker<at::Tensor>::packed_type(), IValuePacker<at::Tensor>::packed_type(),
         IValuePacker<int64_t>::packed_type(), IValuePacker<int64_t>::packed_type(),
         IValuePacker<double>::packed_type(), IValuePacker<double>::packed_type(),
         IValuePacker<double>::packed_type()},
        args, saved, grads);
    saved.after(input_);
    saved.after(target_);
    saved.after(weight_);
    saved.after(lse_);
    saved.after(denominators_);
    return result;
  }
};

template <bool kTriton>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_loss_autograd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, bool check_target) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = loss_op<kTriton>().call(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                                  check_target);
  }
  // Nothing to record (evaluation, no_grad): no node, no saved tensors.
  if (!torch::autograd::compute_requires_grad(input, target)) return out;
  auto& [loss, lse, denominators] = out;
  auto node = c10::make_intrusive<CrossEntropyLossBackward<kTriton>>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, target));
  node->reduction_ = reduction;
  node->ignore_index_ = ignore_index;
  node->label_smoothing_ = label_smoothing;
  node->z_loss_ = z_loss;
  node->softcap_ = softcap;
  torch::autograd::set_history(loss, node);
  node->input_ = torch::autograd::SavedVariable(input, false);
  node->target_ = torch::autograd::SavedVariable(target, false);
  node->weight_ = torch::autograd::SavedVariable(weight.value_or(at::Tensor()), false);
  node->lse_ = torch::autograd::SavedVariable(lse, false);
  node->denominators_ = torch::autograd::SavedVariable(denominators, false);
  return out;
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
