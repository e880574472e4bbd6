// Schemas of the fastsam ops and the Python module init of fastsam._C.
// The math of every op is specified by fastsam/ops/reference.py (the CVaR ops: fastsam/ops/cvar_reference.py);
// the CPU and CUDA kernels register implementations of these schemas with TORCH_LIBRARY_IMPL (csrc/cpu,
// csrc/cuda). The loss-scale arguments (inv_scale, found_inf) default to none, so a call without them is
// the unscaled, ungated op; restore_adam_ takes them all (a schema cannot default a Tensor[] to empty). The operator is "t_mode", not "mode": torch.library's mode redirection passes its own "mode" argument.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastsam._C registers the ops; the module itself holds no functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastsam, m) {
  m.def(
      "norm_sq_(Tensor(a!) acc, Tensor[] grads, Tensor[] params, Tensor[] row_scales, int t_mode, float eta, "
      "Tensor[] ema, float sigma, Tensor? inv_scale=None) -> ()");
  m.def("row_norm_(Tensor(a!)[] out, Tensor[] params, float eta) -> ()");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor[] row_scales, Tensor norm_sq, "
      "float rho, float eps, int t_mode, float eta, bool sign, Tensor(c!)[] ema, float sigma, float lmbda, "
      "Tensor? inv_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "reflect_(Tensor(a!)[] params, Tensor[] backups, Tensor[] dirs, Tensor norm_sq, float rho, float eps, "
      "Tensor[] grads, Tensor(b!)[] grad_copies, Tensor? inv_scale=None, Tensor? found_inf=None) -> ()");
  m.def("dot_norm_sq_(Tensor(a!) acc, Tensor[] a, Tensor[] b) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def(
      "restore_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, Tensor(b!)[] momentum_buffers, "
      "float lr, float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
      "bool init_momentum, Tensor[] grads_b, Tensor[] grads_c, Tensor? coef, Tensor? inv_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "restore_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float weight_decay, float eps, "
      "bool decoupled, bool maximize, float step, Tensor[] grads_b, Tensor[] grads_c, Tensor? coef, "
      "Tensor? inv_scale, Tensor? found_inf, Tensor[] steps) -> ()");
  // CVaR: functional (they return new tensors); value and var are 0-dim in opmath (fp32, fp64 for fp64).
  m.def("cvar_select(Tensor losses, float alpha) -> (Tensor value, Tensor var, Tensor weights)");
  m.def(
      "cvar_cross_entropy(Tensor logits, Tensor target, float alpha, int ignore_index, float label_smoothing) "
      "-> (Tensor value, Tensor var, Tensor grad_logits)");
  m.def(
      "cvar_bce_with_logits(Tensor logits, Tensor target, Tensor? pos_weight, float alpha, bool per_sample, "
      "float ignore_index) -> (Tensor value, Tensor var, Tensor grad_logits)");
}
