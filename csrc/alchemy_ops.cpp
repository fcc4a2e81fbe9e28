// The table of contents of alchemy_ops: every operator schema, once.
//
// Kernels: csrc/cpu/<op>.cpp (CPU), csrc/cuda/<op>.cu (CUDA), and for the
// triton_* schemas alchemy_ops/triton/<op>.py (registered from Python).
// Fake kernels and autograd formulas are registered from Python
// (alchemy_ops/_ops.py and the per-op modules).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(alchemy_ops, m) {
  // (log-)softmax(input / temperature) along dim; dtype casts the input first,
  // as in torch.softmax. backward returns the gradient wrt the cast input.
  m.def("softmax_forward(Tensor input, int dim, float temperature, bool log, ScalarType? dtype) -> Tensor");
  m.def("softmax_backward(Tensor grad_output, Tensor output, int dim, float temperature, bool log) -> Tensor");
  m.def("triton_softmax_forward(Tensor input, int dim, float temperature, bool log, ScalarType? dtype) -> Tensor");
  m.def("triton_softmax_backward(Tensor grad_output, Tensor output, int dim, float temperature, bool log) -> Tensor");

  // Cross-entropy over the class dim 1 of input [N, C, d1, ...] (dim 0 of [C]), read in place.
  // target: class indices (int64, input's shape without dim 1) or class probabilities (input's
  // shape and dtype). weight: [C] in the accumulation dtype (fp32; fp64 for fp64 input).
  // softcap <= 0 means none. Returns (loss, lse) per position: loss unreduced in the accumulation
  // dtype, 0 at ignore_index; lse in fp64 (max + log-sum, unrounded, for an exact backward). check_target raises IndexError for a class index outside
  // [0, C) that is not ignore_index; unchecked, such a position gets a NaN loss and gradient.
  m.def("cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, float z_loss, float softcap, bool check_target) -> (Tensor, Tensor)");
  // grad_loss: per position, the accumulation dtype; lse as forward returned it. Returns d loss / d input.
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap) -> Tensor");
  // Forward, then overwrites input with grad_scale (per position) * d loss / d input: the
  // gradient costs no memory beyond the logits, which are consumed.
  m.def("cross_entropy_forward_inplace(Tensor(a!) input, Tensor target, Tensor? weight, Tensor grad_scale, int ignore_index, float label_smoothing, float z_loss, float softcap, bool check_target) -> (Tensor, Tensor)");
  // All of F.cross_entropy in one call (csrc/autograd/cross_entropy_loss.cpp): the per-position
  // forward above, then the reduction (0 none, 1 mean, 2 sum: at::Reduction), with a C++ autograd
  // formula. Returns (loss in the accumulation dtype, reduced or per position; lse per position,
  // fp64; denominators fp64 [2]: the summed weight of the non-ignored class indices (the mean's
  // divisor) and their count). With reduction mean the z-loss term is divided by that count, not by
  // the summed weights (Liger-Kernel's definition).
  m.def("cross_entropy_loss(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index, float label_smoothing, float z_loss, float softcap, bool check_target) -> (Tensor, Tensor, Tensor)");
  m.def("triton_cross_entropy_loss(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index, float label_smoothing, float z_loss, float softcap, bool check_target) -> (Tensor, Tensor, Tensor)");
  // d loss / d input from the gradient of cross_entropy_loss's loss and what it returned.
  m.def("cross_entropy_loss_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor lse, Tensor denominators, int reduction, int ignore_index, float label_smoothing, float z_loss, float softcap) -> Tensor");
  m.def("triton_cross_entropy_loss_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor lse, Tensor denominators, int reduction, int ignore_index, float label_smoothing, float z_loss, float softcap) -> Tensor");
  m.def("triton_cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, float z_loss, float softcap, bool check_target) -> (Tensor, Tensor)");
  m.def("triton_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap) -> Tensor");
  m.def("triton_cross_entropy_forward_inplace(Tensor(a!) input, Tensor target, Tensor? weight, Tensor grad_scale, int ignore_index, float label_smoothing, float z_loss, float softcap, bool check_target) -> (Tensor, Tensor)");

  // Vocab-parallel cross-entropy, one shard of the classes: columns [class_start, class_start + C)
  // of a vocabulary split over ranks (alchemy/cross_entropy_shard.h). input [N, C]; target int64
  // [N], global class indices or ignore_index (others are the caller's to check); weight [C],
  // this shard's class weights in the accumulation dtype. stats: [N, 6] in the accumulation
  // dtype, the ShardStat columns per position (zeros but the weight sum where ignored), for the
  // caller to all-gather and combine. backward: dx = (coeffs[:, 0] * exp(z - lse)
  // - coeffs[:, 1] * w - [class == target] coeffs[:, 2]) * dz/dx, 0 where ignored; lse [N] fp64
  // (the whole vocabulary's), coeffs [N, 3] in the accumulation dtype.
  m.def("cross_entropy_shard_stats(Tensor input, Tensor target, Tensor? weight, int class_start, int ignore_index, float softcap, bool smoothing) -> Tensor");
  m.def("cross_entropy_shard_backward(Tensor input, Tensor target, Tensor? weight, Tensor lse, Tensor coeffs, int class_start, int ignore_index, float softcap) -> Tensor");
  m.def("triton_cross_entropy_shard_stats(Tensor input, Tensor target, Tensor? weight, int class_start, int ignore_index, float softcap, bool smoothing) -> Tensor");
  m.def("triton_cross_entropy_shard_backward(Tensor input, Tensor target, Tensor? weight, Tensor lse, Tensor coeffs, int class_start, int ignore_index, float softcap) -> Tensor");

  // Gumbel-softmax sample softmax((logits + g) / tau) along dim, g = -log(-log(u)) with u the
  // Philox4x32-10 uniform of Triton's tl.rand(seed, offset + logical index) (alchemy/philox.h);
  // seed: int64 [1] on the logits' device. Returns (y, y_soft), contiguous: y is the soft sample,
  // or for hard the one-hot at argmax(logits + g); y_soft is the soft sample of hard=True when
  // keep_soft (what the straight-through backward needs), else empty [0]. No backward op: the
  // gradient is softmax_backward(grad, soft sample, dim, tau, log=False).
  m.def("gumbel_softmax_forward(Tensor logits, Tensor seed, int offset, float tau, bool hard, bool keep_soft, int dim) -> (Tensor, Tensor)");
  // The uniforms u of that stream, float32 [numel], u[k] = tl.rand(seed, offset + k) bit for bit
  // (before the clamp): what the tests compare across backends.
  m.def("philox_uniform(Tensor seed, int offset, int numel) -> Tensor");
  m.def("triton_philox_uniform(Tensor seed, int offset, int numel) -> Tensor");
  m.def("triton_gumbel_softmax_forward(Tensor logits, Tensor seed, int offset, float tau, bool hard, bool keep_soft, int dim) -> (Tensor, Tensor)");
  // Top-k softmax along the last dim (the Python API moves any other dim there). Returns
  // (weights [..., k] in the accumulation dtype (fp32; fp64 for fp64), indices [..., k] int64, lse [...]):
  // sorted by descending logit, NaN first, ties to the lowest index; weights = exp((x - max) / T - lse)
  // with lse the log-sum-exp of (x - max) / T over the k selected (renormalize) or the whole row;
  // NaN for a row whose max is NaN or +-inf.
  m.def("topk_softmax_forward(Tensor logits, int k, bool renormalize, float temperature) -> (Tensor, Tensor, Tensor)");
  // d sum(grad_weights * weights) / d logits, from the saved logits, weights, indices and lse.
  m.def("topk_softmax_backward(Tensor grad_weights, Tensor logits, Tensor weights, Tensor indices, Tensor lse, bool renormalize, float temperature) -> Tensor");
  m.def("triton_topk_softmax_forward(Tensor logits, int k, bool renormalize, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def("triton_topk_softmax_backward(Tensor grad_weights, Tensor logits, Tensor weights, Tensor indices, Tensor lse, bool renormalize, float temperature) -> Tensor");
}

#ifndef ALCHEMY_CPU_CAPABILITY
#define ALCHEMY_CPU_CAPABILITY "DEFAULT"
#endif

namespace alchemy {
// csrc/autograd/python_calls.cpp
PyObject* cross_entropy_loss_call(PyObject* module, PyObject* const* args, Py_ssize_t nargs);
PyObject* softmax_call(PyObject* module, PyObject* const* args, Py_ssize_t nargs);
}

static PyMethodDef alchemy_methods[] = {
    {"cross_entropy_loss", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&alchemy::cross_entropy_loss_call)),
     METH_FASTCALL, "the loss of alchemy_ops::cross_entropy_loss; the common ao.cross_entropy call"},
    {"softmax", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&alchemy::softmax_call)), METH_FASTCALL,
     "alchemy_ops::softmax_forward without dtype=; the common ao.softmax / ao.log_softmax call"},
    {nullptr, nullptr, 0, nullptr}};

// `import alchemy_ops._C` loads the operators above; the module also records how it was built.
static PyModuleDef alchemy_module = {PyModuleDef_HEAD_INIT, "_C", "alchemy_ops compiled kernels", -1, alchemy_methods};

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&alchemy_module);
  if (module == nullptr) return nullptr;
#ifdef ALCHEMY_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddStringConstant(module, "cpu_capability", ALCHEMY_CPU_CAPABILITY) < 0 ||
      PyModule_AddObject(module, "with_cuda", PyBool_FromLong(with_cuda)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
