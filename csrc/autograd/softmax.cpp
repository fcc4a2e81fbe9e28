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
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["log"] = log;
    ctx->saved_data["input_dtype"] = static_cast<int64_t>(input.scalar_type());
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor output = ctx->get_saved_variables()[0];
    at::Tensor grad_input =
        backward_op<kTriton>().call(grads[0], output, ctx->saved_data["dim"].toInt(),
                                    ctx->saved_data["temperature"].toDouble(), ctx->saved_data["log"].toBool());
    const auto input_dtype = static_cast<at::ScalarType>(ctx->saved_data["input_dtype"].toInt());
    if (grad_input.scalar_type() != input_dtype) grad_input = grad_input.to(input_dtype);
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <bool kTriton>
at::Tensor softmax_autograd(const at::Tensor& input, int64_t dim, double temperature, bool log,
                            std::optional<at::ScalarType> dtype) {
  return SoftmaxFunction<kTriton>::apply(input, dim, temperature, log, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, Autograd, m) {
  m.impl("softmax_forward", &softmax_autograd<false>);
  m.impl("triton_softmax_forward", &softmax_autograd<true>);
}

}  // namespace alchemy
