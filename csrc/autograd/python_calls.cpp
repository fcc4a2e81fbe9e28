// alchemy_ops._C.cross_entropy_loss and _C.softmax: the common ao.cross_entropy and ao.(log_)softmax
// calls, straight from Python to the dispatcher. torch.ops parses the arguments against the schema
// into boxed values and boxes the outputs back, as long as a short row's whole forward; these
// entries take plain tensors and already-typed options and return the one result. The Python
// wrappers send subclasses, torch-function modes and anything these reject through torch.ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>

namespace alchemy {

// (input, target, weight or None, reduction 0/1/2, ignore_index, label_smoothing, z_loss, check_target)
// -> loss. Plain torch.Tensor arguments only: the wrapper sends subclasses and modes through torch.ops.
PyObject* cross_entropy_loss_call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8 || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) ||
      (args[2] != Py_None && !THPVariable_Check(args[2]))) {
    PyErr_SetString(PyExc_TypeError, "alchemy_ops._C.cross_entropy_loss: expected (Tensor, Tensor, Tensor?, int, int, float, float, bool)");
    return nullptr;
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const at::Tensor& target = THPVariable_Unpack(args[1]);
  const std::optional<at::Tensor> weight =
      args[2] == Py_None ? std::nullopt : std::optional<at::Tensor>(THPVariable_Unpack(args[2]));
  const int64_t reduction = PyLong_AsLongLong(args[3]);
  const int64_t ignore_index = PyLong_AsLongLong(args[4]);
  const double label_smoothing = PyFloat_AsDouble(args[5]);
  const double z_loss = PyFloat_AsDouble(args[6]);
  const int check_target = PyObject_IsTrue(args[7]);
  if (PyErr_Occurred()) return nullptr;
  using LossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const std::optional<at::Tensor>&, int64_t, int64_t,
                                                                double, double, double, bool);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("alchemy_ops::cross_entropy_loss", "").typed<LossFn>();
  at::Tensor loss;
  {
    pybind11::gil_scoped_release no_gil;  // a large loss runs for milliseconds
    loss = std::get<0>(op.call(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, 0.0,
                               check_target != 0));
  }
  return THPVariable_Wrap(std::move(loss));
  END_HANDLE_TH_ERRORS
}

// (input, dim, temperature, log) -> softmax_forward(input, dim, temperature, log, dtype=None).
PyObject* softmax_call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 || !THPVariable_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "alchemy_ops._C.softmax: expected (Tensor, int, float, bool)");
    return nullptr;
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const int64_t dim = PyLong_AsLongLong(args[1]);
  const double temperature = PyFloat_AsDouble(args[2]);
  const int log = PyObject_IsTrue(args[3]);
  if (PyErr_Occurred()) return nullptr;
  using SoftmaxFn = at::Tensor(const at::Tensor&, int64_t, double, bool, std::optional<at::ScalarType>);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("alchemy_ops::softmax_forward", "").typed<SoftmaxFn>();
  at::Tensor output;
  {
    pybind11::gil_scoped_release no_gil;
    output = op.call(input, dim, temperature, log != 0, std::nullopt);
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

}  // namespace alchemy
