#include "optimized/model/linear.h"

namespace paritron::opt {

DTensor gather_sequence(ModelContext& m, const DTensor& x) {
  if (m.tp() == 1 || !m.sequence_parallel()) return x;
  DTensor out = m.be.empty(x.dtype(), {x.rows() * m.tp(), x.cols()});
  m.comm.all_gather(x.view({x.rows(), x.cols()}), out, m.ps.tp);
  return out;
}

DTensor reduce_scatter_sequence(ModelContext& m, const DTensor& x) {
  if (m.tp() == 1 || !m.sequence_parallel()) return x;
  DTensor out = m.be.empty(x.dtype(), {x.rows() / m.tp(), x.cols()});
  m.comm.reduce_scatter(x.view({x.rows(), x.cols()}), out, m.ps.tp);
  return out;
}

void all_reduce_tensor(ModelContext& m, DTensor& x) {
  if (m.tp() > 1) m.comm.all_reduce(x, m.ps.tp);
}

DTensor column_parallel_forward(ModelContext& m, const std::string& prefix, const DTensor& x, LinearSaved& saved,
                                bool add_bias) {
  const Param& w = m.param(prefix + "weight");
  saved.input = gather_sequence(m, x);
  DTensor y = m.empty({saved.input.rows(), w.value.size(0)});
  m.be.gemm(saved.input, false, w.value, true, y, 1.0f, 0.0f, add_bias ? m.param_or_null(prefix + "bias") : nullptr);
  return y;
}

DTensor column_parallel_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                 const LinearSaved& saved) {
  Param& w = m.param(prefix + "weight");
  DTensor dx = m.empty({dy.rows(), w.value.size(1)});
  m.be.gemm(dy, false, w.value, false, dx);
  m.be.gemm(dy, true, saved.input, false, w.grad, 1.0f, 1.0f);
  w.used = true;
  if (m.has_param(prefix + "bias")) {
    Param& b = m.param(prefix + "bias");
    m.be.bias_grad(dy, b.grad, true);
    b.used = true;
  }
  if (m.sequence_parallel()) return reduce_scatter_sequence(m, dx);
  all_reduce_tensor(m, dx);
  return dx;
}

DTensor row_parallel_forward(ModelContext& m, const std::string& prefix, const DTensor& x, LinearSaved& saved) {
  const Param& w = m.param(prefix + "weight");
  saved.input = x;
  DTensor partial = m.empty({x.rows(), w.value.size(0)});
  m.be.gemm(x, false, w.value, true, partial);
  if (m.sequence_parallel()) return reduce_scatter_sequence(m, partial);
  all_reduce_tensor(m, partial);
  return partial;
}

DTensor row_parallel_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                              const LinearSaved& saved) {
  Param& w = m.param(prefix + "weight");
  const DTensor dy_full = gather_sequence(m, dy);
  DTensor dx = m.empty({dy_full.rows(), w.value.size(1)});
  m.be.gemm(dy_full, false, w.value, false, dx);
  m.be.gemm(dy_full, true, saved.input, false, w.grad, 1.0f, 1.0f);
  w.used = true;
  return dx;
}

}  // namespace paritron::opt
