// alchemy_ops._C.cross_entropy_loss and _C.softmax: the common ao.cross_entropy and ao.(log_)softmax
// calls, straight from Python to the dispatcher. torch.ops parses the arguments against the schema
// into boxed values and boxes the outputs back, as long as a short row's whole forward; these
// entries take plain tensors and exactly-typed options and return the one result.
//
// They return None (decline) for anything that needs the Python wrappers' handling: tensor
// subclasses and torch-function modes (torch.ops' __torch_function__ dispatch), autocast on the
// input's device (the wrappers' dtype policy), a device the cpp operators do not cover, options of
// other Python types (the wrappers' casts and messages). The operators check the values
// themselves and raise; the wrappers then retry on their checked path for their own message.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <initializer_list>
#include <optional>
#include <tuple>

namespace alchemy {
namespace {

bool with_cuda() {
#ifdef ALCHEMY_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Whether the entry takes `input` and `others` (each a plain tensor or None) as they are.
bool plain_call(PyObject* input, std::initializer_list<PyObject*> others) {
  if (!THPVariable_CheckExact(input) || at::impl::torch_function_mode_enabled()) return false;
  const at::Tensor& x = THPVariable_Unpack(input);
  const at::DeviceType device = x.device().type();
  if (!(device == at::kCPU || (device == at::kCUDA && with_cuda())) || at::autocast::is_autocast_enabled(device))
    return false;
  for (PyObject* other : others) {
    if (other == Py_None) continue;
    if (!THPVariable_CheckExact(other) || THPVariable_Unpack(other).device().type() != device) return false;
  }
  return true;
}

bool exact_number(PyObject* o) { return PyFloat_CheckExact(o) || PyLong_CheckExact(o); }

}  // namespace

// (input, target, weight or None, reduction 0/1/2, ignore_index, label_smoothing, z_loss, check_target)
// -> the loss in the input's dtype, or None.
PyObject* cross_entropy_loss_call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "alchemy_ops._C.cross_entropy_loss: expected 8 arguments");
    return nullptr;
  }
  if (!plain_call(args[0], {args[1], args[2]}) || args[1] == Py_None || !PyLong_CheckExact(args[3]) ||
      !PyLong_CheckExact(args[4]) || !exact_number(args[5]) || !exact_number(args[6]) || !PyBool_Check(args[7]))
    Py_RETURN_NONE;
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const at::Tensor& target = THPVariable_Unpack(args[1]);
  const std::optional<at::Tensor> weight =
      args[2] == Py_None ? std::nullopt : std::optional<at::Tensor>(THPVariable_Unpack(args[2]));
  if (weight && !at::isFloatingType(weight->scalar_type())) Py_RETURN_NONE;  // the wrapper casts it
  const int64_t reduction = PyLong_AsLongLong(args[3]);
  const int64_t ignore_index = PyLong_AsLongLong(args[4]);
  const double label_smoothing = PyFloat_AsDouble(args[5]);
  const double z_loss = PyFloat_AsDouble(args[6]);
  if (PyErr_Occurred()) {  // an int beyond int64: the wrapper's checks say so
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  using LossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const std::optional<at::Tensor>&, int64_t, int64_t,
                                                                double, double, double, bool);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("alchemy_ops::cross_entropy_loss", "").typed<LossFn>();
  at::Tensor loss;
  {
    pybind11::gil_scoped_release no_gil;  // a large loss runs for milliseconds
    loss = std::get<0>(op.call(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, 0.0,
                               args[7] == Py_True));
    if (loss.scalar_type() != input.scalar_type()) loss = loss.to(input.scalar_type());
  }
  return THPVariable_Wrap(std::move(loss));
  END_HANDLE_TH_ERRORS
}

// (input, dim, temperature, log) -> softmax_forward(input, dim, temperature, log, dtype=None), or None.
PyObject* softmax_call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "alchemy_ops._C.softmax: expected 4 arguments");
    return nullptr;
  }
  if (!plain_call(args[0], {}) || !PyLong_CheckExact(args[1]) || !exact_number(args[2]) || !PyBool_Check(args[3]))
    Py_RETURN_NONE;
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const int64_t dim = PyLong_AsLongLong(args[1]);
  const double temperature = PyFloat_AsDouble(args[2]);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  using SoftmaxFn = at::Tensor(const at::Tensor&, int64_t, double, bool, std::optional<at::ScalarType>);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("alchemy_ops::softmax_forward", "").typed<SoftmaxFn>();
  at::Tensor output;
  {
    pybind11::gil_scoped_release no_gil;
    output = op.call(input, dim, temperature, args[3] == Py_True, std::nullopt);
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

}  // namespace alchemy
