// Tests of the optimized MoE layer (optimized/model/moe.h) against the
// reference (reference/moe_layer.h via run_reference on a moe_layer case):
// forward outputs, router outputs (logits, probs, scores, indices, tokens per
// expert, aux and z losses), the input gradient and every weight gradient;
// on the CPU backend with ThreadComm ranks, EP = 1, 2, 4 (world = dp = ep,
// each rank its own batch slice, compared with the reference run on that
// slice; an expert's gradient is the sum over the EP ranks' slices), F64
// (truth: ~1e-11) and F32 (vs the F32-emulating reference and vs the truth).
// Also the router math of optimized/math/router.h and the unsupported
// configurations' errors; tensor (+ sequence) parallelism through the runner
// (optimized/run_case.h), against the reference on each rank's token group
// (a data-parallel slice x the rank's s / tp sequence positions), for the
// moe_layer and moe_router components.
#include "optimized/model/moe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"
#include "optimized/backend.h"
#include "optimized/comm/run_ranks.h"
#include "optimized/math/router.h"
#include "optimized/run_case.h"
#include "reference/make_case.h"
#include "reference/run_case.h"

namespace paritron::opt {
namespace {

// ---------------------------------------------------------------------------
// router.h

TEST(RouterMath, TopkOrderAndTies) {
  const double row[] = {0.5, 2.0, 0.5, -1.0, 2.0, 0.7};
  int64_t idx[4];
  math::topk_row(row, 6, 4, idx);
  EXPECT_EQ(idx[0], 1);
  EXPECT_EQ(idx[1], 4);  // equal values: ascending index
  EXPECT_EQ(idx[2], 5);
  EXPECT_EQ(idx[3], 0);
  const float nan_row[] = {1.0f, std::nanf(""), 3.0f};
  int64_t j[2];
  math::topk_row(nan_row, 3, 2, j);
  EXPECT_EQ(j[0], 1);  // NaN first, as torch.topk
  EXPECT_EQ(j[1], 2);
  int64_t all[6];
  math::topk_row(row, 6, 6, all);
  EXPECT_EQ(std::vector<int64_t>(all, all + 6), (std::vector<int64_t>{1, 4, 5, 0, 2, 3}));
}

TEST(RouterMath, SoftmaxAndLogsumexp) {
  const double x[] = {1.0, 2.0, 3.0};
  double p[3];
  math::softmax_row(x, p, 3);
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(p[i], std::exp(x[i]) / z, 1e-15);
  EXPECT_NEAR(math::logsumexp_row(x, 3), std::log(z), 1e-14);
  const double big[] = {1000.0, 1000.0};
  EXPECT_NEAR(math::logsumexp_row(big, 2), 1000.0 + std::log(2.0), 1e-12);
  const double g[] = {1.0, 0.0, -1.0};
  EXPECT_NEAR(math::softmax_backward_dot(p, g, 3), p[0] - p[2], 1e-15);
  EXPECT_DOUBLE_EQ(math::aux_loss_prob_grad<double>(4, 0.5, 3, 2, 6), 4 * 0.5 * 3 / (2.0 * 36));
}

// ---------------------------------------------------------------------------
// The layer against the reference.

struct Spec {
  int64_t h = 16, experts = 4, k = 2, ffn = 12;
  int64_t s = 4, b = 4;
  bool bias = true, gated = false;
  std::string activation = "gelu";
  double init_std = 0.3;
  uint64_t seed = 11;
  bool training = false;
  std::function<void(TransformerConfig&)> edit;
};

TransformerConfig config_of(const Spec& sp) {
  TransformerConfig cfg;
  cfg.num_layers = 1;
  cfg.hidden_size = sp.h;
  cfg.num_attention_heads = 2;
  cfg.kv_channels = 8;
  cfg.ffn_hidden_size = sp.ffn;
  cfg.num_moe_experts = sp.experts;
  cfg.moe_router_topk = sp.k;
  cfg.add_bias_linear = sp.bias;
  cfg.gated_linear_unit = sp.gated;
  cfg.activation_func = sp.activation;
  cfg.init_method_std = sp.init_std;
  if (sp.edit) sp.edit(cfg);
  validate_config(cfg);
  return cfg;
}

Case make_moe_case(const Spec& sp) {
  ref::MakeCaseOptions o;
  o.component = "moe_layer";
  o.config = config_of(sp);
  o.seed = sp.seed;
  o.seq_length = sp.s;
  o.micro_batch_size = sp.b;
  o.backward = true;
  o.taps = false;
  o.training = sp.training;
  return ref::make_case(o);
}

// t [s, b, ...] -> [s, bl, ...], sequences [off, off + bl).
Tensor batch_slice(const Tensor& t, int64_t off, int64_t bl) {
  const Shape& sh = t.shape();
  const int64_t s = sh[0], b = sh[1];
  int64_t inner = 1;
  for (size_t d = 2; d < sh.size(); ++d) inner *= sh[d];
  Shape out_shape = sh;
  out_shape[1] = bl;
  std::vector<double> v;
  v.reserve(static_cast<size_t>(s * bl * inner));
  for (int64_t i = 0; i < s; ++i) {
    for (int64_t j = off; j < off + bl; ++j) {
      for (int64_t c = 0; c < inner; ++c) v.push_back(t.get((i * b + j) * inner + c));
    }
  }
  return Tensor::from_values(DType::F64, out_shape, v);
}

Case slice_case(const Case& c, int64_t off, int64_t bl) {
  Case r = c;
  for (auto it = r.tensors.begin(); it != r.tensors.end();) {
    if (it->first.rfind("outputs.", 0) == 0 || it->first.rfind("grads.", 0) == 0) {
      it = r.tensors.erase(it);
    } else if (it->first.rfind("inputs.", 0) == 0) {
      it->second = batch_slice(it->second, off, bl);
      ++it;
    } else {
      ++it;
    }
  }
  return r;
}

struct RankResult {
  std::map<std::string, Tensor> t;  // output, output_bias, dx, router_*, grad.<key>
  std::optional<double> aux, z;
  std::vector<int64_t> tokens_per_expert;
  int64_t ep_index = 0;
  std::vector<int64_t> ep_group;  // global ranks of this rank's EP group
};

// Runs the optimized layer on dp thread ranks (dp = ep unless given), each its batch slice.
std::vector<RankResult> run_optimized(const Case& c, int64_t ep, DType dtype, int64_t dp_size = 0) {
  const int64_t world = dp_size > 0 ? dp_size : ep;
  const TransformerConfig& cfg = c.config;
  const Tensor& x_all = c.tensors.at("inputs.hidden_states");
  const int64_t s = x_all.shape()[0], b = x_all.shape()[1], h = cfg.hidden_size;
  const int64_t E = *cfg.num_moe_experts;
  ParallelConfig pc;
  pc.data_parallel_size = world;
  pc.expert_model_parallel_size = ep;
  std::vector<RankResult> results(static_cast<size_t>(world));
  run_on_threads(world, [&](Comm& comm) {
    auto be = make_backend("cpu");
    ParallelState ps = make_parallel_state(pc, comm.rank());
    const int64_t dp = ps.dp.size(), bl = b / dp, off = ps.dp.index * bl;
    const int64_t e_loc = E / ps.ep.size(), first = ps.ep.index * e_loc;
    ModelContext m(*be, comm, ps, cfg, dtype);
    m.seed = c.seed.value_or(0);
    m.training = c.training;
    for (const auto& [name, t] : c.tensors) {
      if (name.rfind("weights.", 0) != 0) continue;
      const std::string key = name.substr(8);
      const std::string ex = "experts.local_experts.";
      bool expert = false;
      if (key.rfind(ex, 0) == 0) {
        const int64_t e = std::stoll(key.substr(ex.size()));
        if (e < first || e >= first + e_loc) continue;
        expert = true;
      }
      Param p;
      p.value = be->upload(t, dtype);
      p.grad = be->zeros(m.grad_dtype, t.shape());
      p.global_shape = t.shape();
      p.expert = expert;
      m.params.emplace(key, std::move(p));
    }
    TokenLayout tl;
    tl.s_global = s;
    tl.b_global = b;
    tl.b_local = bl;
    tl.batch_offset = off;
    for (int64_t i = 0; i < s; ++i) tl.seq.push_back(i);
    tl.sp_begin = 0;
    tl.sp_count = s;
    const int64_t T = s * bl;
    auto local = [&](const std::string& name) {
      return be->upload(batch_slice(c.tensors.at(name), off, bl), dtype).view({T, h});
    };
    const DTensor x = local("inputs.hidden_states");
    MoeSaved saved;
    const DTensor out = moe_forward(m, "", "", x, tl, saved);
    RankResult& r = results[static_cast<size_t>(comm.rank())];
    r.ep_index = ps.ep.index;
    r.ep_group = ps.ep.ranks;
    r.t["output"] = be->download(out).to(DType::F64);
    if (saved.output_bias.defined()) r.t["output_bias"] = be->download(saved.output_bias).to(DType::F64);
    r.t["router_logits"] = saved.router_logits;
    if (saved.router_probs) r.t["router_probs"] = *saved.router_probs;
    r.t["router_scores"] = saved.router_scores;
    r.t["router_indices"] = saved.router_indices;
    r.aux = saved.aux_loss;
    r.z = saved.z_loss;
    r.tokens_per_expert = saved.tokens_per_expert;
    const DTensor dy = local("inputs.grad_output");
    DTensor dyb;
    const bool has_dyb = c.tensors.count("inputs.grad_output_bias") > 0;
    if (has_dyb) dyb = local("inputs.grad_output_bias");
    const DTensor dx = moe_backward(m, "", dy, has_dyb ? &dyb : nullptr, tl, saved);
    r.t["dx"] = be->download(dx).to(DType::F64);
    for (auto& [key, p] : m.params) {
      EXPECT_TRUE(p.used) << "rank " << comm.rank() << ": " << key << " got no gradient";
      r.t["grad." + key] = be->download(p.grad).to(DType::F64);
    }
  });
  return results;
}

void expect_close(const Tensor& got, const Tensor& want, double rtol, const std::string& what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  double scale = 0, err = 0;
  int64_t worst = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    scale = std::max(scale, std::fabs(want.get(i)));
    const double e = std::fabs(got.get(i) - want.get(i));
    if (e > err || std::isnan(e)) {
      err = e;
      worst = i;
    }
  }
  if (std::getenv("MOE_TEST_VERBOSE")) std::printf("%-60s err %.3g scale %.3g\n", what.c_str(), err, scale);
  EXPECT_LE(err, rtol * std::max(scale, 1e-12))
      << what << ": max error " << err << " at " << worst << " (got " << got.get(worst) << ", want " << want.get(worst)
      << "), scale " << scale;
}

// Compares the optimized ranks with the reference on each rank's batch slice.
void check_against(const Case& c, const std::vector<RankResult>& got, DType ref_dtype, double rtol,
                   bool exact_selection, const std::string& label) {
  const int64_t world = static_cast<int64_t>(got.size());
  const int64_t b = c.tensors.at("inputs.hidden_states").shape()[1], bl = b / world;
  std::vector<std::map<std::string, Tensor>> want(static_cast<size_t>(world));
  ref::ReferenceOptions o;
  o.dtype = ref_dtype;
  for (int64_t r = 0; r < world; ++r) {
    want[static_cast<size_t>(r)] = ref::run_reference(slice_case(c, r * bl, bl), o).tensors;
  }
  const int64_t E = *c.config.num_moe_experts, e_loc = E / static_cast<int64_t>(got[0].ep_group.size());
  for (int64_t r = 0; r < world; ++r) {
    const RankResult& g = got[static_cast<size_t>(r)];
    const auto& w = want[static_cast<size_t>(r)];
    const std::string at = label + " rank " + std::to_string(r) + ": ";
    auto cmp = [&](const std::string& mine, const std::string& theirs) {
      ASSERT_TRUE(w.count(theirs)) << at << "reference lacks " << theirs;
      ASSERT_TRUE(g.t.count(mine)) << at << "optimized lacks " << mine;
      expect_close(g.t.at(mine), w.at(theirs), rtol, at + mine);
    };
    cmp("output", "outputs.output");
    if (w.count("outputs.output_bias")) cmp("output_bias", "outputs.output_bias");
    EXPECT_EQ(g.t.count("output_bias") > 0, w.count("outputs.output_bias") > 0) << at;
    cmp("router_logits", "outputs.router_logits");
    cmp("router_scores", "outputs.router_scores");
    EXPECT_EQ(g.t.count("router_probs") > 0, w.count("outputs.router_probs") > 0) << at;
    if (w.count("outputs.router_probs")) cmp("router_probs", "outputs.router_probs");
    if (exact_selection) {
      const Tensor& wi = w.at("outputs.router_indices");
      const Tensor& gi = g.t.at("router_indices");
      ASSERT_EQ(wi.numel(), gi.numel()) << at;
      for (int64_t i = 0; i < wi.numel(); ++i) EXPECT_EQ(gi.get(i), wi.get(i)) << at << "router_indices " << i;
      const Tensor& wt = w.at("outputs.tokens_per_expert");
      for (int64_t e = 0; e < E; ++e) {
        EXPECT_EQ(g.tokens_per_expert[static_cast<size_t>(e)], static_cast<int64_t>(wt.get(e))) << at << "expert " << e;
      }
    }
    EXPECT_EQ(g.aux.has_value(), w.count("outputs.aux_loss") > 0) << at;
    if (g.aux && w.count("outputs.aux_loss")) {
      EXPECT_NEAR(*g.aux, w.at("outputs.aux_loss").get(0), rtol * std::max(1e-12, std::fabs(*g.aux))) << at << "aux";
    }
    EXPECT_EQ(g.z.has_value(), w.count("outputs.z_loss") > 0) << at;
    if (g.z && w.count("outputs.z_loss")) {
      EXPECT_NEAR(*g.z, w.at("outputs.z_loss").get(0), rtol * std::max(1e-12, std::fabs(*g.z))) << at << "z";
    }
    cmp("dx", "grads.inputs.hidden_states");
    // Replicated weights: this rank's own slice.
    for (const auto& [name, t] : w) {
      if (name.rfind("grads.weights.", 0) != 0) continue;
      const std::string key = name.substr(14);
      if (key.rfind("experts.", 0) == 0) continue;
      cmp("grad." + key, name);
    }
  }
  // Expert weights: on each owner (the rank of its EP group holding the
  // expert), the sum over that EP group's slices (the data-modulo-expert
  // reduction across groups is the runner's).
  for (const auto& [name, t] : want[0]) {
    if (name.rfind("grads.weights.experts.local_experts.", 0) != 0) continue;
    const std::string key = name.substr(14);
    const int64_t e = std::stoll(key.substr(std::string("experts.local_experts.").size()));
    for (int64_t q = 0; q < world; ++q) {
      const RankResult& g = got[static_cast<size_t>(q)];
      if (g.ep_index != e / e_loc) {
        EXPECT_FALSE(g.t.count("grad." + key)) << key << " on rank " << q;
        continue;
      }
      std::vector<double> sum(static_cast<size_t>(t.numel()), 0.0);
      for (int64_t r : g.ep_group) {
        const Tensor& wr = want[static_cast<size_t>(r)].at(name);
        for (int64_t i = 0; i < wr.numel(); ++i) sum[static_cast<size_t>(i)] += wr.get(i);
      }
      ASSERT_TRUE(g.t.count("grad." + key)) << label << ": owner rank " << q << " lacks " << key;
      expect_close(g.t.at("grad." + key), Tensor::from_values(DType::F64, t.shape(), sum), rtol,
                   label + " rank " + std::to_string(q) + " expert grad " + key);
    }
  }
}

// F64 against the truth; F32 against the F32-emulating reference and the truth.
void check_spec(const Spec& sp, int64_t ep, bool f32 = true) {
  const Case c = make_moe_case(sp);
  const std::string label = "ep" + std::to_string(ep);
  check_against(c, run_optimized(c, ep, DType::F64), DType::F64, 1e-10, true, label + " f64");
  if (f32) {
    const auto r32 = run_optimized(c, ep, DType::F32);
    check_against(c, r32, DType::F32, 2e-6, true, label + " f32 vs f32 reference");
    check_against(c, r32, DType::F64, 2e-5, true, label + " f32 vs truth");
  }
}

// BF16 against the BF16-emulating reference (same routing decisions expected:
// the inputs keep the top-k margins far above a bf16 ulp of the logits).
void check_bf16(const Spec& sp, int64_t ep, double rtol) {
  const Case c = make_moe_case(sp);
  check_against(c, run_optimized(c, ep, DType::BF16), DType::BF16, rtol, true, "ep" + std::to_string(ep) + " bf16");
}

Spec aux_z(Spec sp) {
  auto prev = sp.edit;
  sp.edit = [prev](TransformerConfig& c) {
    if (prev) prev(c);
    c.moe_aux_loss_coeff = 0.1;
    c.moe_z_loss_coeff = 0.01;
  };
  return sp;
}

TEST(MoeLayer, Top2AuxZLossBiasEp1) { check_spec(aux_z(Spec{}), 1); }

TEST(MoeLayer, Top1NoneNoBiasEp1) {
  Spec sp;
  sp.k = 1;
  sp.bias = false;
  sp.edit = [](TransformerConfig& c) { c.moe_router_load_balancing_type = "none"; };
  check_spec(sp, 1);
}

TEST(MoeLayer, Top1AuxLossEp1) {
  Spec sp;
  sp.k = 1;
  check_spec(aux_z(sp), 1);
}

TEST(MoeLayer, SwigluJitterEp1) {
  Spec sp = aux_z(Spec{});
  sp.gated = true;
  sp.activation = "silu";
  auto prev = sp.edit;
  sp.edit = [prev](TransformerConfig& c) {
    prev(c);
    c.moe_input_jitter_eps = 0.05;
  };
  check_spec(sp, 1);
}

TEST(MoeLayer, PreSoftmaxScaledEp1) {
  Spec sp = aux_z(Spec{});
  sp.experts = 6;
  sp.k = 3;
  auto prev = sp.edit;
  sp.edit = [prev](TransformerConfig& c) {
    prev(c);
    c.moe_router_pre_softmax = true;
    c.moe_router_topk_scaling_factor = 2.5;
  };
  check_spec(sp, 1);
}

TEST(MoeLayer, Bf16Top2) {
  check_bf16(aux_z(Spec{}), 1, 2e-2);
  check_bf16(aux_z(Spec{}), 2, 2e-2);
}

Spec sinkhorn(int64_t k, bool training) {
  Spec sp;
  sp.k = k;
  sp.training = training;
  sp.s = 6;
  sp.init_std = 0.1;  // moderate logits: sinkhorn converges quickly
  sp.edit = [](TransformerConfig& c) {
    c.moe_router_load_balancing_type = "sinkhorn";
    c.moe_z_loss_coeff = 0.01;
  };
  return sp;
}

TEST(MoeLayer, Sinkhorn) {
  for (int64_t k : {1, 2}) {
    // The cases are meaningful: sinkhorn's selection differs from act's.
    const Tensor train = make_moe_case(sinkhorn(k, true)).tensors.at("outputs.router_indices");
    const Tensor eval = make_moe_case(sinkhorn(k, false)).tensors.at("outputs.router_indices");
    EXPECT_FALSE(train.bitwise_equal(eval)) << "k = " << k;
    for (bool training : {true, false}) {
      for (int64_t ep : {1, 2}) check_spec(sinkhorn(k, training), ep);
    }
  }
}

TEST(MoeLayer, Top2AuxZLossEp2) { check_spec(aux_z(Spec{}), 2); }

TEST(MoeLayer, Top2JitterEp4) {
  Spec sp = aux_z(Spec{});
  sp.experts = 8;
  sp.b = 4;
  sp.s = 6;
  auto prev = sp.edit;
  sp.edit = [prev](TransformerConfig& c) {
    prev(c);
    c.moe_input_jitter_eps = 0.02;
  };
  check_spec(sp, 4);
}

TEST(MoeLayer, RouterDtypeMatchingTheActivations) {
  // moe_router_dtype = fp32 under fp32 activations (and anything under
  // float64) changes nothing.
  Spec sp = aux_z(Spec{});
  auto prev = sp.edit;
  sp.edit = [prev](TransformerConfig& c) {
    prev(c);
    c.moe_router_dtype = "fp32";
  };
  check_spec(sp, 2);
}

TEST(MoeLayer, Top1NoBiasEp4) {
  Spec sp;
  sp.k = 1;
  sp.bias = false;
  sp.experts = 4;
  check_spec(aux_z(sp), 4);
}

Spec capacity(double factor, const std::string& policy, bool pad) {
  Spec sp = aux_z(Spec{});
  sp.s = 6;
  auto prev = sp.edit;
  sp.edit = [prev, factor, policy, pad](TransformerConfig& c) {
    prev(c);
    c.moe_expert_capacity_factor = factor;
    c.moe_token_drop_policy = policy;
    c.moe_pad_expert_input_to_capacity = pad;
  };
  return sp;
}

int64_t count_of(const Tensor& t, double v) {
  int64_t n = 0;
  for (int64_t i = 0; i < t.numel(); ++i) n += t.get(i) == v ? 1 : 0;
  return n;
}

TEST(MoeLayer, CapacityCasesDrop) {
  for (const char* policy : {"probs", "position"}) {
    const Case c = make_moe_case(capacity(0.5, policy, false));
    EXPECT_GT(count_of(c.tensors.at("outputs.router_scores"), 0.0), 0) << policy;  // dropped pairs
    const Case p = make_moe_case(capacity(1.0, policy, true));
    const Tensor& tpe = p.tensors.at("outputs.tokens_per_expert");
    const int64_t T = 6 * 4, C = T * 2 / 4;                                        // s b, k T / E
    for (int64_t e = 0; e < tpe.numel(); ++e) EXPECT_EQ(tpe.get(e), C) << policy;  // padded to capacity
  }
}

TEST(MoeLayer, CapacityProbs) {
  for (int64_t ep : {1, 2}) {
    check_spec(capacity(1.0, "probs", false), ep);
    check_spec(capacity(0.5, "probs", false), ep);
  }
}

TEST(MoeLayer, CapacityPosition) {
  for (int64_t ep : {1, 2}) {
    check_spec(capacity(1.0, "position", false), ep);
    check_spec(capacity(0.5, "position", false), ep);
  }
}

TEST(MoeLayer, CapacityPadding) {
  for (int64_t ep : {1, 2, 4}) {
    check_spec(capacity(0.5, "probs", true), ep);
    check_spec(capacity(1.0, "position", true), ep);
    check_spec(capacity(4.0, "probs", true), ep);  // C > T: every expert processes every token
  }
}

TEST(MoeLayer, Dp4Ep2) {
  // Two EP groups of two ranks; every rank its own quarter of the batch.
  for (const Spec& sp : {aux_z(Spec{}), capacity(0.5, "probs", true)}) {
    const Case c = make_moe_case(sp);
    check_against(c, run_optimized(c, 2, DType::F64, 4), DType::F64, 1e-10, true, "dp4 ep2 f64");
    check_against(c, run_optimized(c, 2, DType::F32, 4), DType::F32, 2e-6, true, "dp4 ep2 f32");
  }
}

TEST(MoeLayer, ExpertWithoutTokens) {
  // A strongly skewed router: some experts get no token (zero gradients, still "used").
  Spec sp;
  sp.experts = 8;
  sp.k = 1;
  sp.s = 2;
  sp.b = 2;
  sp.init_std = 2.0;
  const Case c = make_moe_case(aux_z(sp));
  EXPECT_GT(count_of(c.tensors.at("outputs.tokens_per_expert"), 0.0), 0);
  check_spec(aux_z(sp), 2);
}

TEST(MoeLayer, RouterBiasAndAnIdleEpRank) {
  // The newer router.bias [E]; a bias steering every token to experts 0 and 1
  // leaves EP rank 1 (experts 2, 3) without rows: it only sends.
  Spec sp = aux_z(Spec{});
  Case c = make_moe_case(sp);
  c.tensors["weights.router.bias"] =
      Tensor::from_values(DType::F64, {4}, std::vector<double>{20.0, 20.0, -20.0, -20.0});
  for (int64_t ep : {1, 2}) {
    check_against(c, run_optimized(c, ep, DType::F64), DType::F64, 1e-10, true, "router bias f64");
    const auto r32 = run_optimized(c, ep, DType::F32);
    check_against(c, r32, DType::F32, 2e-6, true, "router bias f32");
  }
  // With a mild bias all experts stay busy: the bias gradient is exercised too.
  c.tensors["weights.router.bias"] = Tensor::from_values(DType::F64, {4}, std::vector<double>{0.3, -0.2, 0.1, 0.0});
  check_against(c, run_optimized(c, 2, DType::F64), DType::F64, 1e-10, true, "router bias mild f64");
}

// ---------------------------------------------------------------------------
// Tensor and sequence parallelism through the runner.

// [s, b, ...] rows (i in [s0, s0 + sn), j in [b0, b0 + bn)); a moe_router
// case's grad_output [s*b, k] is taken as [s, b, k].
Tensor token_block(const Tensor& t, int64_t S, int64_t B, int64_t s0, int64_t sn, int64_t b0, int64_t bn) {
  const int64_t inner = t.numel() / (S * B);
  std::vector<double> v;
  for (int64_t i = s0; i < s0 + sn; ++i) {
    for (int64_t j = b0; j < b0 + bn; ++j) {
      for (int64_t c = 0; c < inner; ++c) v.push_back(t.get((i * B + j) * inner + c));
    }
  }
  Shape shape = t.shape();
  if (t.dim() >= 2 && shape[0] == S && shape[1] == B) {
    shape[0] = sn;
    shape[1] = bn;
  } else {
    shape = {sn * bn, inner};
  }
  return Tensor::from_values(t.dtype(), shape, v);
}

// The reference on each token group of a cp = 1 layout with one micro-batch:
// the rows of every token result, sums of the rest (counts, losses, weight grads).
std::map<std::string, Tensor> expected_by_groups(const Case& c, const ParallelConfig& pc, DType dtype) {
  const Shape& x = c.tensors.at("inputs.hidden_states").shape();
  const int64_t S = x[0], B = x[1];
  const int64_t dp = pc.data_parallel_size, sp = pc.sequence_parallel ? pc.tensor_model_parallel_size : 1;
  const int64_t bn = B / dp, sn = S / sp;
  ref::ReferenceOptions o;
  o.dtype = dtype;
  std::map<std::string, Tensor> total;
  for (int64_t d = 0; d < dp; ++d) {
    for (int64_t q = 0; q < sp; ++q) {
      Case sub = c;
      for (auto it = sub.tensors.begin(); it != sub.tensors.end();) {
        if (it->first.rfind("outputs.", 0) == 0 || it->first.rfind("grads.", 0) == 0) {
          it = sub.tensors.erase(it);
          continue;
        }
        if (it->first.rfind("inputs.", 0) == 0) it->second = token_block(it->second, S, B, q * sn, sn, d * bn, bn);
        ++it;
      }
      for (auto& [name, t] : ref::run_reference(sub, o).tensors) {
        if (name.rfind("outputs.intermediate.", 0) == 0) continue;  // one group's internals
        const bool rows = name == "outputs.output" || name == "outputs.output_bias" ||
                          name == "grads.inputs.hidden_states" || name.rfind("outputs.router_", 0) == 0;
        auto it = total.find(name);
        if (it == total.end()) {
          Shape shape = t.shape();
          if (rows && t.dim() == 3) shape[0] = S, shape[1] = B;
          if (rows && t.dim() == 2) shape[0] = S * B;
          it = total.emplace(name, Tensor(DType::F64, shape)).first;
        }
        const int64_t inner = rows ? t.numel() / (sn * bn) : 0;
        for (int64_t i = 0; i < t.numel(); ++i) {
          if (!rows) {
            it->second.set(i, it->second.get(i) + t.get(i));
            continue;
          }
          const int64_t row = i / inner, si = row / bn, bj = row % bn;
          it->second.set(((q * sn + si) * B + d * bn + bj) * inner + i % inner, t.get(i));
        }
      }
    }
  }
  return total;
}

void expect_layout(const Case& c, const std::string& layout, DType dtype, double rtol) {
  const ParallelConfig pc = ParallelConfig::parse_layout(layout);
  OptimizedOptions o;
  o.dtype = dtype;
  const OptimizedResult got = ::paritron::opt::run_optimized(c, pc, o);
  const auto want = expected_by_groups(c, pc, dtype);
  int compared = 0;
  for (const auto& [name, w] : want) {
    if (name.rfind("outputs.intermediate.", 0) == 0) continue;
    auto it = got.tensors.find(name);
    ASSERT_NE(it, got.tensors.end()) << layout << ": the optimized run lacks " << name;
    ASSERT_EQ(it->second.numel(), w.numel()) << layout << ": " << name << " " << shape_string(it->second.shape())
                                             << " vs " << shape_string(w.shape());
    if (!is_floating(w.dtype()) || name == "outputs.tokens_per_expert" || name == "outputs.router_indices") {
      for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(it->second.get(i), w.get(i)) << layout << ": " << name << " " << i;
    } else {
      expect_close(it->second, w, rtol, layout + " " + std::string(dtype_name(dtype)) + ": " + name);
    }
    ++compared;
  }
  EXPECT_GE(compared, c.component == "moe_router" ? 6 : 12) << layout;
}

Case make_case_of(const Spec& sp, const std::string& component) {
  ref::MakeCaseOptions o;
  o.component = component;
  o.config = config_of(sp);
  o.seed = sp.seed;
  o.seq_length = sp.s;
  o.micro_batch_size = sp.b;
  o.backward = true;
  o.taps = false;
  return ref::make_case(o);
}

void four_heads(TransformerConfig& c) {  // (tp4 needs heads divisible by 4)
  c.num_attention_heads = 4;
  c.kv_channels = 4;
}

Spec tp_spec() {
  Spec sp;
  sp.s = 8;
  sp.b = 4;
  sp.edit = [](TransformerConfig& c) {
    four_heads(c);
    c.moe_aux_loss_coeff = 0.01;
    c.moe_z_loss_coeff = 0.001;
  };
  return sp;
}

TEST(MoeLayerTensorParallel, SequenceParallelLayouts) {
  const Case c = make_case_of(tp_spec(), "moe_layer");
  for (const char* layout : {"tp2-sp", "tp2-dp2-sp", "tp2-ep2-dp2-sp", "tp4-sp", "tp2"}) {
    expect_layout(c, layout, DType::F64, 1e-10);
    expect_layout(c, layout, DType::F32, 1e-5);
  }
}

TEST(MoeLayerTensorParallel, CapacityDroppingAndPadding) {
  for (const auto& [factor, pad] : std::vector<std::pair<double, bool>>{{0.5, false}, {1.0, false}, {0.5, true}}) {
    Spec sp = tp_spec();
    sp.edit = [factor, pad](TransformerConfig& c) {
      four_heads(c);
      c.moe_aux_loss_coeff = 0.01;
      c.moe_expert_capacity_factor = factor;
      c.moe_pad_expert_input_to_capacity = pad;
    };
    const Case c = make_case_of(sp, "moe_layer");
    for (const char* layout : {"tp2-sp", "tp2-dp2-sp", "tp2-ep2-dp2-sp"}) expect_layout(c, layout, DType::F64, 1e-10);
  }
}

TEST(MoeLayerTensorParallel, GatedTop1WithoutBias) {
  Spec sp = tp_spec();
  sp.k = 1;
  sp.gated = true;
  sp.activation = "silu";
  sp.bias = false;
  const Case c = make_case_of(sp, "moe_layer");
  for (const char* layout : {"tp2-sp", "tp2-ep2-dp2-sp"}) {
    expect_layout(c, layout, DType::F64, 1e-10);
    expect_layout(c, layout, DType::F32, 1e-5);
  }
}

TEST(MoeRouterComponent, DataAndSequenceParallel) {
  Spec sp = tp_spec();
  const auto base = sp.edit;
  sp.edit = [base](TransformerConfig& c) {
    base(c);
    c.moe_expert_capacity_factor = 1.0;
  };
  const Case c = make_case_of(sp, "moe_router");
  for (const char* layout : {"tp1", "dp2", "tp2-sp", "tp2-dp2-sp"}) {
    expect_layout(c, layout, DType::F64, 1e-10);
    expect_layout(c, layout, DType::F32, 1e-5);
  }
  Spec jitter = tp_spec();
  jitter.training = true;
  jitter.edit = [](TransformerConfig& c) {
    four_heads(c);
    c.moe_input_jitter_eps = 0.05;
    c.moe_router_pre_softmax = true;
  };
  const Case j = make_case_of(jitter, "moe_router");
  for (const char* layout : {"dp2", "tp2-sp"}) expect_layout(j, layout, DType::F64, 1e-10);
}

// ---------------------------------------------------------------------------
// Unsupported configurations throw, naming the field.

void expect_unsupported(const std::function<void(TransformerConfig&)>& edit, const std::string& needle, int64_t tp = 1,
                        DType dtype = DType::F64) {
  Spec sp;
  sp.edit = edit;
  TransformerConfig cfg = config_of(sp);
  ParallelConfig pc;
  pc.tensor_model_parallel_size = tp;
  run_on_threads(1, [&](Comm& comm) {
    auto be = make_backend("cpu");
    ModelContext m(*be, comm, make_parallel_state(pc, 0), cfg, dtype);
    const DTensor x = be->zeros(dtype, {4, sp.h});
    MoeSaved saved;
    TokenLayout tl;
    try {
      moe_forward(m, "", "", x, tl, saved);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  });
}

TEST(MoeLayer, UnsupportedConfigsThrow) {
  expect_unsupported([](TransformerConfig& c) { c.moe_router_score_function = "sigmoid"; },
                     "moe_router_score_function");
  expect_unsupported(
      [](TransformerConfig& c) {
        c.moe_grouped_gemm = true;
        c.add_bias_linear = false;
      },
      "moe_grouped_gemm");
  expect_unsupported([](TransformerConfig& c) { c.moe_router_dtype = "fp32"; }, "moe_router_dtype", 1, DType::BF16);
  expect_unsupported([](TransformerConfig& c) { c.moe_router_dtype = "fp64"; }, "moe_router_dtype", 1, DType::F32);
}

}  // namespace
}  // namespace paritron::opt
