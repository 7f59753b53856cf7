// What every op's autograd file needs to build its nodes: they are written as
// ATen's generated ones are (a torch::autograd::Node with SavedVariables, set
// as the outputs' grad_fn), not as a torch::autograd::Function, which
// torch.func refuses.
#pragma once

#include <torch/csrc/autograd/function.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace growop::autograd {

// torch::autograd::Node is held by c10::intrusive_ptr in newer torch (2.13) and by
// std::shared_ptr in older (2.11): follow whatever Edge::function is.
using NodePtr = decltype(torch::autograd::Edge::function);
inline constexpr bool kSharedNodes =
    std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>;

template <class T>
using NodeHandle =
    std::conditional_t<kSharedNodes, std::shared_ptr<T>, c10::intrusive_ptr<T>>;

template <class T, class... Args>
NodeHandle<T> make_node(Args&&... args) {
  if constexpr (kSharedNodes) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

}  // namespace growop::autograd
