// What the hand-written autograd nodes (softmax.cpp, cross_entropy_loss.cpp) share.
//
// They are written as PyTorch's generated nodes are (SoftmaxBackward0 and the like), not with
// torch::autograd::Function: its CppNode keeps a string-keyed saved_data map, variable-info
// vectors and a context object per call, and names itself by demangling typeid — together as
// long as a short row's whole forward+backward in PyTorch.
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

namespace alchemy {

// Compiled autograd (torch._dynamo.config.compiled_autograd) records a node's backward as one
// call of its functional form, `fn(grads, packed args)`, bound to Python under the node's name.
// Python keeps one registry per process and refuses a name bound twice, hence the set.
inline torch::autograd::variable_list compiled_autograd_call(const torch::autograd::Node& node,
                                                             torch::autograd::functional_apply_t fn,
                                                             std::vector<at::TypePtr> schema,
                                                             const torch::dynamo::autograd::PackedArgs& args,
                                                             torch::dynamo::autograd::SwapSavedVariables& saved,
                                                             const torch::autograd::variable_list& grads) {
  namespace ca = torch::dynamo::autograd;
  const auto& python = ca::getPyCompilerInterface();
  const std::string name = node.name();
  {
    static std::mutex mutex;
    static std::unordered_set<std::string> bound;
    const std::lock_guard<std::mutex> lock(mutex);
    if (bound.insert(name).second)
      python->bind_function(saved.get_py_compiler(), name, std::move(fn), std::move(schema));
  }
  const at::IValue output_metadata =
      ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          ca::get_input_metadata(node.next_edges()));
  return python->call_function(saved.get_py_compiler(), "apply_functional", name, grads, args.vec(),
                               output_metadata);
}

}  // namespace alchemy
