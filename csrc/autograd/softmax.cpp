// Autograd of softmax_forward / triton_softmax_forward as a C++ node: no Python runs per call, so
// a short row costs what torch.log_softmax's does. Backward is the softmax_backward operator,
// called through the dispatcher with autograd on, so its own (Python-registered) formula still
// gives double backward. The gradient is returned in the input's dtype (dtype= widens in forward).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

namespace alchemy {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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

template <bool kTriton>
struct SoftmaxFunction : public torch::autograd::Function<SoftmaxFunction<kTriton>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, int64_t dim, double temperature, bool log,
                            std::optional<at::ScalarType> dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = forward_op<kTriton>().call(input, dim, temperature, log, dtype);
    ctx->save_for_backward({output});
    // One saved_data entry (each is a string-keyed hash insert, a share of a short row's cost).
    ctx->saved_data["options"] = std::make_tuple(dim, temperature, log, static_cast<int64_t>(input.scalar_type()));
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor output = ctx->get_saved_variables()[0];
    const auto options = ctx->saved_data["options"].toTuple();
    const int64_t dim = options->elements()[0].toInt();
    const double temperature = options->elements()[1].toDouble();
    const bool log = options->elements()[2].toBool();
    const auto input_dtype = static_cast<at::ScalarType>(options->elements()[3].toInt());
    // Without create_graph, skip softmax_backward's autograd kernel (registered from Python, tens of
    // microseconds per call); with it, that kernel records the double-backward node.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    at::Tensor grad_input = backward_op<kTriton>().call(grads[0], output, dim, temperature, log);
    if (grad_input.scalar_type() != input_dtype) grad_input = grad_input.to(input_dtype);
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <bool kTriton>
at::Tensor softmax_autograd(const at::Tensor& input, int64_t dim, double temperature, bool log,
                            std::optional<at::ScalarType> dtype) {
  if (!at::GradMode::is_enabled() || !input.requires_grad()) {  // nothing to record: no node
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op<kTriton>().call(input, dim, temperature, log, dtype);
  }
  return SoftmaxFunction<kTriton>::apply(input, dim, temperature, log, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, Autograd, m) {
  m.impl("softmax_forward", &softmax_autograd<false>);
  m.impl("triton_softmax_forward", &softmax_autograd<true>);
}

}  // namespace alchemy
