// Autograd of softmax_forward / triton_softmax_forward as a C++ node: no Python runs per call, so
// a short row costs what torch.log_softmax's does. Backward is the softmax_backward operator,
// called through the dispatcher (with autograd on under create_graph, so its own
// Python-registered formula gives double backward). The gradient is returned in the input's dtype
// (dtype= widens in forward).
#include "node_support.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace alchemy {
namespace {

using torch::autograd::variable_list;
using torch::dynamo::autograd::IValuePacker;
using torch::dynamo::autograd::PackedArgs;

using ForwardFn = at::Tensor(const at::Tensor&, int64_t, double, bool, std::optional<at::ScalarType>);
using BackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double, bool);

template <bool kTriton>
const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kTriton ? "alchemy_ops::triton_softmax_forward" : "alchemy_ops::softmax_forward", "")
          .typed<ForwardFn>();
  return op;
}

template <bool kTriton>
const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kTriton ? "alchemy_ops::triton_softmax_backward" : "alchemy_ops::softmax_backward", "")
          .typed<BackwardFn>();
  return op;
}

// The backward formula, shared by the node and compiled autograd's functional call.
template <bool kTriton>
variable_list softmax_backward(const variable_list& grads, const at::Tensor& output, int64_t dim, double temperature,
                               bool log, at::ScalarType input_dtype) {
  if (!grads[0].defined()) return {at::Tensor()};
  // Without create_graph, skip softmax_backward's autograd kernel (registered from Python, tens of
  // microseconds per call); with it, that kernel records the double-backward node.
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!at::GradMode::is_enabled()) below_autograd.emplace();
  at::Tensor grad_input = backward_op<kTriton>().call(grads[0], output, dim, temperature, log);
  if (grad_input.scalar_type() != input_dtype) grad_input = grad_input.to(input_dtype);
  return {std::move(grad_input)};
}

template <bool kTriton>
variable_list softmax_backward_packed(const variable_list& grads, const std::vector<c10::IValue>& args) {
  PackedArgs packed(args);
  const auto output = packed.unpack<at::Tensor>();
  const auto dim = packed.unpack<int64_t>();
  const auto temperature = packed.unpack<double>();
  const auto log = packed.unpack<bool>();
  const auto input_dtype = packed.unpack<at::ScalarType>();
  return softmax_backward<kTriton>(grads, output, dim, temperature, log, input_dtype);
}

template <bool kTriton>
struct SoftmaxBackward final : torch::autograd::Node {
  torch::autograd::SavedVariable output_;
  int64_t dim_ = 0;
  double temperature_ = 1;
  bool log_ = false;
  at::ScalarType input_dtype_ = at::kFloat;

  std::string name() const override {
    return kTriton ? "AlchemyTritonSoftmaxBackward" : "AlchemySoftmaxBackward";
  }

  variable_list apply(variable_list&& grads) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    return softmax_backward<kTriton>(grads, output_.unpack(getptr()), dim_, temperature_, log_, input_dtype_);
  }

  void release_variables() override { output_.reset_data(); }

  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    args.collect(output_, /*is_output=*/true);
    args.collect(dim_);
    args.collect(temperature_);
    args.collect(log_);
    args.collect(input_dtype_);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::autograd::SwapSavedVariables& saved) override {
    saved.before(output_);
    PackedArgs args;
    args.pack(output_.unpack(getptr()));
    args.pack(dim_);
    args.pack(temperature_);
    args.pack(log_);
    args.pack(input_dtype_);
    variable_list result = compiled_autograd_call(
        *this, softmax_backward_packed<kTriton>,
        {IValuePacker<at::Tensor>::packed_type(), IValuePacker<int64_t>::packed_type(),
         IValuePacker<double>::packed_type(), IValuePacker<bool>::packed_type(),
         IValuePacker<at::ScalarType>::packed_type()},
        args, saved, grads);
    saved.after(output_);
    return result;
  }
};

template <bool kTriton>
at::Tensor softmax_autograd(const at::Tensor& input, int64_t dim, double temperature, bool log,
                            std::optional<at::ScalarType> dtype) {
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    output = forward_op<kTriton>().call(input, dim, temperature, log, dtype);
  }
  if (!torch::autograd::compute_requires_grad(input)) return output;  // nothing to record: no node
  auto node = c10::make_intrusive<SoftmaxBackward<kTriton>>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  node->dim_ = dim;
  node->temperature_ = temperature;
  node->log_ = log;
  node->input_dtype_ = input.scalar_type();
  torch::autograd::set_history(output, node);
  node->output_ = torch::autograd::SavedVariable(output, /*is_output=*/true);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, Autograd, m) {
  m.impl("softmax_forward", &softmax_autograd<false>);
  m.impl("triton_softmax_forward", &softmax_autograd<true>);
}

}  // namespace alchemy
