// Operator schemas of the growop library. Each backend registers its kernels
// in its own file (csrc/cpu/, csrc/cuda/); fake (meta) kernels and autograd
// are registered from Python in growop/ops.py.
#include <Python.h>
#include <torch/library.h>

// Lets setup.py build this as the importable module growop._C; importing it
// runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(growop, m) {
  // out[..., j] = input @ weight[j] + bias[j] where active[j], else mask_value,
  // for j < width. mask_value None means the lowest finite value of the dtype.
  m.def(
      "masked_linear(Tensor input, Tensor weight, Tensor? bias, Tensor active, "
      "SymInt width, float? mask_value) -> Tensor");
  // d(input) = grad_output[..., live] @ weight[live]
  m.def(
      "masked_linear_backward_input(Tensor grad_output, Tensor weight, "
      "Tensor active) -> Tensor");
  // d(weight)[live] = grad_output[..., live]^T @ input; every other row zero.
  m.def(
      "masked_linear_backward_weight(Tensor grad_output, Tensor input, "
      "Tensor active) -> Tensor");
  // d(bias)[live] = grad_output[..., live] summed over the batch; others zero.
  m.def(
      "masked_linear_backward_bias(Tensor grad_output, Tensor active) -> Tensor");
}
