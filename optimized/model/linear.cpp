#include "optimized/model/linear.h"

#include "common/math/fp8.h"
#include "optimized/comm/groups.h"
#include "optimized/faults.h"

namespace paritron::opt {

using faults::Fault;

DTensor gather_sequence(ModelContext& m, const DTensor& x) {
  if (m.tp() == 1 || !m.sequence_parallel()) return x;
  DTensor out = m.be.empty(x.dtype(), {x.rows() * m.tp(), x.cols()});
  if (faults::active(Fault::missing_sp_allgather)) {  // no all-gather: the rank's own rows, repeated
    for (int64_t r = 0; r < m.tp(); ++r) {
      DTensor dst = out.slice0(r * x.rows(), x.rows());
      m.be.copy(x.view({x.rows(), x.cols()}), dst);
    }
    return out;
  }
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

// ---------------------------------------------------------------------------
// fp8 (see linear.h).

// run_reference runs F64 as the truth (truth_precision: no fp8) and emulates
// fp8 only with F32/BF16/F16 activations; the optimized side does the same.
bool fp8_enabled(const ModelContext& m) { return m.cfg.fp8.has_value() && m.dtype != DType::F64 && m.fp8_linears; }

void reduce_amax(ModelContext& m, std::vector<float>& amaxes) {
  // TE: fp8.py reduces the amax buffer with torch.distributed.all_reduce(op=MAX,
  // group=fp8_group); Megatron's fp8_group is the amax reduction group, the
  // TP x DP x CP ranks of one pipeline stage (parallel_state.py). The Comm sums
  // only, so every member's amaxes are gathered and the max taken (exact).
  const Group g = make_group(m.ps.pc, GroupKind::kTensorDataContext, m.ps.rank);
  if (g.size() == 1 || amaxes.empty()) return;
  const auto n = static_cast<int64_t>(amaxes.size());
  Tensor host(DType::F32, {n});
  for (int64_t i = 0; i < n; ++i) host.set(i, amaxes[static_cast<size_t>(i)]);
  DTensor all = m.be.empty(DType::F32, {g.size() * n});
  m.comm.all_gather(m.be.upload(host, DType::F32), all, g);
  const Tensor gathered = m.be.download(all);
  for (int64_t r = 0; r < g.size(); ++r) {
    for (int64_t i = 0; i < n; ++i) {
      float& a = amaxes[static_cast<size_t>(i)];
      a = math::fp8_amax_step(a, static_cast<float>(gathered.get(r * n + i)));
    }
  }
}

std::vector<DTensor> fp8_cast(ModelContext& m, std::initializer_list<Fp8Operand> operands) {
  const Fp8Format format = parse_fp8_format(*m.cfg.fp8);
  std::vector<float> amaxes;
  for (const Fp8Operand& o : operands) amaxes.push_back(static_cast<float>(m.be.amax(*o.x)));
  reduce_amax(m, amaxes);
  std::vector<DTensor> out;
  size_t i = 0;
  for (const Fp8Operand& o : operands) {
    // The steady-state delayed scale of the global amax (reference/linear.cpp
    // fp8_fake_quant without a session); an all-zero tensor keeps scale 1.
    const float scale =
        scale_for_amax(amaxes[i++], fp8_float_format(format, o.role), static_cast<int>(m.cfg.fp8_margin));
    // fp32 operands (F64 in float64 runs): the GEMM consumes q * scale_inv, not
    // a bf16 rounding of it (cuBLASLt applies scale_inv to the fp32 accumulator).
    DTensor q = m.empty_f32(o.x->shape());
    m.be.fp8_fake_quant(*o.x, fp8_dtype(format, o.role) == DType::F8_E5M2, scale, q);
    out.push_back(std::move(q));
  }
  return out;
}

// ---------------------------------------------------------------------------
// The linears.

DTensor column_parallel_forward(ModelContext& m, const std::string& prefix, const DTensor& x, LinearSaved& saved,
                                bool add_bias) {
  const Param& w = m.param(prefix + "weight");
  saved.input = gather_sequence(m, x);
  // Under fp8 the gathered input is quantised; TE casts before the SP gather,
  // which with the group-wide amax gives the same values.
  DTensor x_gemm = saved.input, w_gemm = w.value;
  if (fp8_enabled(m)) {
    std::vector<DTensor> q = fp8_cast(m, {{&saved.input, Fp8Role::kInput}, {&w.value, Fp8Role::kWeight}});
    x_gemm = q[0];
    w_gemm = saved.weight = q[1];
    if (m.cfg.fp8_wgrad) saved.input = q[0];
  }
  DTensor y = m.empty({x_gemm.rows(), w.value.size(0)});
  m.be.gemm(x_gemm, false, w_gemm, true, y, 1.0f, 0.0f, add_bias ? m.param_or_null(prefix + "bias") : nullptr);
  return y;
}

DTensor column_parallel_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                 const LinearSaved& saved) {
  Param& w = m.param(prefix + "weight");
  DTensor dy_dgrad = dy, dy_wgrad = dy, w_dgrad = w.value;
  if (fp8_enabled(m)) {
    dy_dgrad = fp8_cast(m, {{&dy, Fp8Role::kGradOutput}})[0];
    w_dgrad = saved.weight;
    if (m.cfg.fp8_wgrad) dy_wgrad = dy_dgrad;
  }
  DTensor dx = m.empty({dy.rows(), w.value.size(1)});
  m.be.gemm(dy_dgrad, false, w_dgrad, false, dx);
  m.be.gemm(dy_wgrad, true, saved.input, false, w.grad, 1.0f, 1.0f);
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
  DTensor x_gemm = x, w_gemm = w.value;
  if (fp8_enabled(m)) {
    // x and W are column shards: their amaxes are reduced over TP (and DP x CP).
    std::vector<DTensor> q = fp8_cast(m, {{&x, Fp8Role::kInput}, {&w.value, Fp8Role::kWeight}});
    x_gemm = q[0];
    w_gemm = saved.weight = q[1];
    if (m.cfg.fp8_wgrad) saved.input = q[0];
  }
  DTensor partial = m.empty({x.rows(), w.value.size(0)});
  m.be.gemm(x_gemm, false, w_gemm, true, partial);
  if (faults::active(Fault::missing_row_parallel_allreduce) && m.tp() > 1) {
    // No reduction over TP (on every rank alike): each rank keeps its partial
    // sum (under SP, its own rows of it).
    if (!m.sequence_parallel()) return partial;
    const int64_t n = partial.rows() / m.tp();
    DTensor own = m.empty({n, partial.cols()});
    m.be.copy(partial.slice0(m.ps.coord.tp * n, n), own);
    return own;
  }
  if (m.sequence_parallel()) return reduce_scatter_sequence(m, partial);
  all_reduce_tensor(m, partial);
  return partial;
}

DTensor row_parallel_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                              const LinearSaved& saved) {
  Param& w = m.param(prefix + "weight");
  const DTensor dy_full = gather_sequence(m, dy);
  DTensor dy_dgrad = dy_full, dy_wgrad = dy_full, w_dgrad = w.value;
  if (fp8_enabled(m)) {
    dy_dgrad = fp8_cast(m, {{&dy_full, Fp8Role::kGradOutput}})[0];
    w_dgrad = saved.weight;
    if (m.cfg.fp8_wgrad) dy_wgrad = dy_dgrad;
  }
  DTensor dx = m.empty({dy_full.rows(), w.value.size(1)});
  m.be.gemm(dy_dgrad, false, w_dgrad, false, dx);
  m.be.gemm(dy_wgrad, true, saved.input, false, w.grad, 1.0f, 1.0f);
  w.used = true;
  return dx;
}

}  // namespace paritron::opt
