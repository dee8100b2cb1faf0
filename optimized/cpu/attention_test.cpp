// Tests of the CPU flash attention (optimized/cpu/attention.h) against the
// reference DotProductAttention run in float64 truth on the same
// (fp32-representable) inputs: outputs and the gradients dq, dk, dv, for the
// mask kinds, GQA, scales, odd head widths, sq != sk, CP-style query rows,
// a TP head slice and dropout. 16-bit probabilities and the log-sum-exp are
// checked against a naive float64 implementation of AttentionArgs' contract
// (the reference cannot isolate the probability rounding from the rest of a
// bf16 run).
#include "optimized/cpu/attention.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common/math/float_format.h"
#include "common/math/random.h"
#include "common/rng.h"
#include "reference/dot_product_attention.h"
#include "reference/test_util.h"

namespace paritron::opt::cpu {
namespace {

using ref::AttentionMask;
using ref::AttnMaskType;
using ref::Mat;

// Normal values rounded to fp32, held in double.
Mat random_mat(int64_t rows, int64_t cols, uint64_t seed, double sd = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> n(0.0, sd);
  Mat m(rows, cols);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(n(gen));
  return m;
}

std::vector<float> to_f(const Mat& m) {
  std::vector<float> v(static_cast<size_t>(m.size()));
  for (int64_t i = 0; i < m.size(); ++i) v[i] = static_cast<float>(m.data()[i]);
  return v;
}

Mat from_f(const std::vector<float>& v, int64_t rows, int64_t cols) {
  Mat m(rows, cols);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = v[i];
  return m;
}

// max |got - want| <= tol * max |want| (relative to the tensor's scale).
void expect_close(const Mat& got, const Mat& want, double tol, const std::string& what) {
  ASSERT_EQ(got.rows(), want.rows()) << what;
  ASSERT_EQ(got.cols(), want.cols()) << what;
  const double scale = std::max(want.cwiseAbs().maxCoeff(), 1e-30);
  const double err = (got - want).cwiseAbs().maxCoeff();
  EXPECT_LE(err, tol * scale) << what << ": max error " << err << " at scale " << scale;
}

struct Result {
  Mat out, lse, dq, dk, dv;
};

// The kernel's forward and backward on q [sq*b, np*hn], k/v [sk*b, ng*hn].
Result run_opt(const AttentionArgs& a, const Mat& q, const Mat& k, const Mat& v, const Mat& dout) {
  const auto qf = to_f(q), kf = to_f(k), vf = to_f(v), df = to_f(dout);
  std::vector<float> out(qf.size()), lse(static_cast<size_t>(a.batch * a.heads * a.sq));
  attention_forward(a, qf.data(), kf.data(), vf.data(), out.data(), lse.data());
  std::vector<float> dq(qf.size(), 7.0f), dk(kf.size(), 7.0f), dv(vf.size(), 7.0f);  // overwritten
  attention_backward(a, qf.data(), kf.data(), vf.data(), out.data(), lse.data(), df.data(), dq.data(), dk.data(),
                     dv.data());
  Result r;
  r.out = from_f(out, q.rows(), q.cols());
  r.lse = from_f(lse, a.batch * a.heads, a.sq);
  r.dq = from_f(dq, q.rows(), q.cols());
  r.dk = from_f(dk, k.rows(), k.cols());
  r.dv = from_f(dv, v.rows(), v.cols());
  return r;
}

// The reference (float64 truth): forward, then backward with d_output.
Result run_ref(const TransformerConfig& cfg, const Mat& q, const Mat& k, const Mat& v, const Mat& dout, int64_t b,
               AttnMaskType type, const std::optional<AttentionMask>& mask, const ref::RunContext& ctx = {}) {
  const ref::Precision p = ref::truth_precision();
  const auto f = ref::dot_product_attention_forward(cfg, q, k, v, b, type, mask, p, ctx);
  const auto g = ref::dot_product_attention_backward(cfg, q, k, v, f, dout, p);
  return Result{f.output, Mat(), g.d_query, g.d_key, g.d_value};
}

// A naive float64 implementation of AttentionArgs' contract (positions,
// masks, fill, dropout, probs_dtype rounding; the backward as Megatron's
// autograd: dS from the unrounded P, masked entries pass no gradient).
Result run_naive(const AttentionArgs& a, const Mat& q, const Mat& k, const Mat& v, const Mat& dout) {
  const int64_t hn = a.head_dim, r = a.heads / a.groups;
  const int64_t hg_n = a.heads_global > 0 ? a.heads_global : a.heads;
  const int64_t Sq = a.sq_global > 0 ? a.sq_global : a.sq, Sk = a.sk_global > 0 ? a.sk_global : a.sk;
  Result res;
  res.out = Mat::Zero(q.rows(), q.cols());
  res.lse = Mat::Zero(a.batch * a.heads, a.sq);
  res.dq = Mat::Zero(q.rows(), q.cols());
  res.dk = Mat::Zero(k.rows(), k.cols());
  res.dv = Mat::Zero(v.rows(), v.cols());
  auto round_p = [&](double x) {
    if (a.probs_dtype == DType::BF16) return math::round_to(x, math::kBFloat16);
    if (a.probs_dtype == DType::F16) return math::round_to(x, math::kFloat16);
    return x;
  };
  for (int64_t bi = 0; bi < a.batch; ++bi) {
    for (int64_t h = 0; h < a.heads; ++h) {
      const int64_t g = h / r, hg = a.head_offset + h;
      for (int64_t i = 0; i < a.sq; ++i) {
        const int64_t qp = a.q_positions.empty() ? i : a.q_positions[i];
        std::vector<double> s(a.sk), p(a.sk), pc(a.sk), keep(a.sk, 1.0);
        std::vector<bool> masked(a.sk);
        double mx = -1e300;
        for (int64_t j = 0; j < a.sk; ++j) {
          const int64_t kp = a.k_positions.empty() ? j : a.k_positions[j];
          double dot = 0;
          for (int64_t d = 0; d < hn; ++d) dot += q(i * a.batch + bi, h * hn + d) * k(j * a.batch + bi, g * hn + d);
          bool m = (a.causal && kp > qp) || (a.window[0] >= 0 && kp < qp - a.window[0]) ||
                   (a.window[1] >= 0 && kp > qp + a.window[1]);
          if (a.mask != nullptr) {
            const auto& md = a.mask_dims;
            const int64_t idx = (((md[0] == 1 ? 0 : bi) * md[1] + (md[1] == 1 ? 0 : hg)) * md[2] +
                                 (md[2] == 1 ? 0 : qp)) * md[3] + (md[3] == 1 ? 0 : kp);
            m = m || a.mask[idx] != 0;
          }
          masked[j] = m;
          s[j] = m ? a.fill : static_cast<double>(a.softmax_scale) * dot;
          mx = std::max(mx, s[j]);
          if (a.dropout_p > 0) {
            const uint64_t flat = static_cast<uint64_t>(((bi * hg_n + hg) * Sq + qp) * Sk + kp);
            keep[j] = static_cast<double>(math::uniform_float(a.dropout_key, flat)) >= a.dropout_p
                          ? 1.0 / (1.0 - static_cast<double>(a.dropout_p))
                          : 0.0;
          }
        }
        double z = 0;
        for (int64_t j = 0; j < a.sk; ++j) z += std::exp(s[j] - mx);
        res.lse(bi * a.heads + h, i) = mx + std::log(z);
        for (int64_t j = 0; j < a.sk; ++j) {
          p[j] = std::exp(s[j] - mx) / z;
          pc[j] = round_p(p[j]);
          if (a.dropout_p > 0) pc[j] = round_p(pc[j] * keep[j]);
        }
        std::vector<double> dp(a.sk);
        double D = 0;
        for (int64_t j = 0; j < a.sk; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < hn; ++d) {
            res.out(i * a.batch + bi, h * hn + d) += pc[j] * v(j * a.batch + bi, g * hn + d);
            res.dv(j * a.batch + bi, g * hn + d) += pc[j] * dout(i * a.batch + bi, h * hn + d);
            dot += dout(i * a.batch + bi, h * hn + d) * v(j * a.batch + bi, g * hn + d);
          }
          dp[j] = dot * keep[j];
          D += p[j] * dp[j];
        }
        for (int64_t j = 0; j < a.sk; ++j) {
          const double ds = masked[j] ? 0.0 : p[j] * (dp[j] - D) * static_cast<double>(a.softmax_scale);
          for (int64_t d = 0; d < hn; ++d) {
            res.dq(i * a.batch + bi, h * hn + d) += ds * k(j * a.batch + bi, g * hn + d);
            res.dk(j * a.batch + bi, g * hn + d) += ds * q(i * a.batch + bi, h * hn + d);
          }
        }
      }
    }
  }
  return res;
}

// One head-dim / shape setup: random inputs and the matching kernel args.
struct Inputs {
  int64_t b, sq, sk, np, ng, hn;
  Mat q, k, v, dout;
  TransformerConfig cfg;
  AttentionArgs args;
  std::vector<uint8_t> mask_bytes;

  Inputs(int64_t b_, int64_t sq_, int64_t sk_, int64_t np_, int64_t ng_, int64_t hn_, uint64_t seed = 1)
      : b(b_), sq(sq_), sk(sk_), np(np_), ng(ng_), hn(hn_) {
    q = random_mat(sq * b, np * hn, seed);
    k = random_mat(sk * b, ng * hn, seed + 1);
    v = random_mat(sk * b, ng * hn, seed + 2);
    dout = random_mat(sq * b, np * hn, seed + 3);
    cfg = ref::test_util::attention_config(np, ng, hn, np * hn);
    args.batch = b, args.sq = sq, args.sk = sk, args.heads = np, args.groups = ng, args.head_dim = hn;
    args.softmax_scale = static_cast<float>(ref::attention_scale(cfg, 1).alpha);
  }
  void set_mask(const AttentionMask& m) {
    mask_bytes.clear();
    for (int64_t e = 0; e < m.batch(); ++e)
      for (int64_t h = 0; h < m.heads(); ++h)
        for (int64_t i = 0; i < m.sq(); ++i)
          for (int64_t j = 0; j < m.sk(); ++j) mask_bytes.push_back(m.masked(e, h, i, j) ? 1 : 0);
    args.mask = mask_bytes.data();
    args.mask_dims = m.dims();
  }
};

constexpr double kTol = 1e-5;

void compare_all(const Result& got, const Result& want, double tol = kTol) {
  expect_close(got.out, want.out, tol, "out");
  expect_close(got.dq, want.dq, tol, "dq");
  expect_close(got.dk, want.dk, tol, "dk");
  expect_close(got.dv, want.dv, tol, "dv");
}

void check_against_ref(Inputs& s, AttnMaskType type, const std::optional<AttentionMask>& mask,
                       const ref::RunContext& ctx = {}) {
  const Result got = run_opt(s.args, s.q, s.k, s.v, s.dout);
  compare_all(got, run_ref(s.cfg, s.q, s.k, s.v, s.dout, s.b, type, mask, ctx));
  // The log-sum-exp against the naive float64 contract.
  expect_close(got.lse, run_naive(s.args, s.q, s.k, s.v, s.dout).lse, kTol, "lse");
}

TEST(CpuAttention, NoMask) {
  Inputs s(2, 150, 150, 2, 2, 64);
  check_against_ref(s, AttnMaskType::no_mask, std::nullopt);
}

TEST(CpuAttention, Causal) {
  Inputs s(1, 200, 200, 2, 2, 64, 5);
  s.args.causal = true;
  check_against_ref(s, AttnMaskType::causal, std::nullopt);
}

TEST(CpuAttention, CausalHeadDim128) {
  Inputs s(1, 130, 130, 2, 1, 128, 6);
  s.args.causal = true;
  check_against_ref(s, AttnMaskType::causal, std::nullopt);
}

// Padding (valid tokens first) with query rows masked entirely: uniform rows
// (the mean of V), and no gradient through them to q, k.
TEST(CpuAttention, PaddingWithFullyMaskedRows) {
  Inputs s(2, 150, 150, 2, 2, 32, 7);
  const std::vector<int64_t> ql = {150, 70}, kl = {130, 90};
  const AttentionMask m = ref::padding_mask(ql, kl, 150, 150);
  s.set_mask(m);
  check_against_ref(s, AttnMaskType::padding, m);
}

// Causal | padding as one explicit mask: fully masked key tiles above the
// diagonal cannot be skipped for the fully masked (padded) rows.
TEST(CpuAttention, CausalAndPaddingExplicit) {
  Inputs s(2, 140, 140, 2, 2, 16, 8);
  const std::vector<int64_t> ql = {140, 30}, kl = {140, 30};
  const AttentionMask m = ref::padding_mask(ql, kl, 140, 140) | ref::get_default_causal_mask(140);
  s.set_mask(m);
  check_against_ref(s, AttnMaskType::padding, m);
}

// A per-head [b, np, sq, sk] mask (the head index matters).
TEST(CpuAttention, PerHeadRandomMask) {
  Inputs s(2, 70, 90, 4, 2, 24, 9);
  AttentionMask m(2, 4, 70, 90);
  std::mt19937 gen(3);
  for (int64_t e = 0; e < 2; ++e)
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t i = 0; i < 70; ++i)
        for (int64_t j = 0; j < 90; ++j) m.set(e, h, i, j, gen() % 3 == 0);
  s.set_mask(m);
  check_against_ref(s, AttnMaskType::padding, m);
}

TEST(CpuAttention, SlidingWindow) {
  Inputs s(1, 300, 300, 2, 2, 32, 10);
  s.cfg.window_size = std::array<int64_t, 2>{50, 20};
  s.args.window = {50, 20};
  check_against_ref(s, AttnMaskType::no_mask, std::nullopt);
}

TEST(CpuAttention, SlidingWindowCausal) {
  Inputs s(1, 300, 300, 2, 2, 32, 11);
  s.cfg.window_size = std::array<int64_t, 2>{70, -1};  // causal type: TE's (left, 0)
  s.args.window = {70, 0};
  s.args.causal = true;
  check_against_ref(s, AttnMaskType::causal, std::nullopt);
}

TEST(CpuAttention, GqaFourHeadsTwoGroups) {
  Inputs s(2, 100, 100, 4, 2, 32, 12);
  s.args.causal = true;
  check_against_ref(s, AttnMaskType::causal, std::nullopt);
}

TEST(CpuAttention, GqaFourHeadsOneGroup) {
  Inputs s(1, 100, 100, 4, 1, 32, 13);
  check_against_ref(s, AttnMaskType::no_mask, std::nullopt);
}

TEST(CpuAttention, SoftmaxScale) {
  Inputs s(1, 80, 80, 2, 2, 32, 14);
  s.cfg.softmax_scale = 0.3;
  s.args.softmax_scale = static_cast<float>(ref::attention_scale(s.cfg, 1).alpha);
  s.args.causal = true;
  check_against_ref(s, AttnMaskType::causal, std::nullopt);
}

TEST(CpuAttention, OddHeadDims) {
  for (const int64_t hn : {1, 5, 13, 20, 72}) {
    SCOPED_TRACE("hn = " + std::to_string(hn));
    Inputs s(1, 70, 70, 2, 1, hn, 15 + static_cast<uint64_t>(hn));
    s.args.causal = true;
    check_against_ref(s, AttnMaskType::causal, std::nullopt);
  }
}

// sq != sk: cross-attention style with no mask, and the bottom-right aligned
// causal window (Megatron's sliding-window mask (-1, 0)) expressed through
// q_positions = (sk - sq) + i.
TEST(CpuAttention, SqNotSk) {
  Inputs s(2, 40, 130, 2, 2, 32, 16);
  check_against_ref(s, AttnMaskType::no_mask, std::nullopt);

  Inputs c(1, 70, 150, 2, 2, 32, 17);
  c.cfg.window_size = std::array<int64_t, 2>{-1, 0};
  std::vector<int64_t> qp(70);
  for (int64_t i = 0; i < 70; ++i) qp[i] = 80 + i;
  c.args.q_positions = qp;
  c.args.causal = true;
  c.args.sq_global = 150;
  check_against_ref(c, AttnMaskType::no_mask, std::nullopt);
}

// Rows [rows] of a [s*b, cols] tensor for sequence positions pos.
Mat seq_rows(const Mat& m, const std::vector<int64_t>& pos, int64_t b) {
  Mat r(static_cast<int64_t>(pos.size()) * b, m.cols());
  for (size_t i = 0; i < pos.size(); ++i)
    for (int64_t e = 0; e < b; ++e) r.row(static_cast<int64_t>(i) * b + e) = m.row(pos[i] * b + e);
  return r;
}

// Context parallelism: a rank holds query chunks c and 2cp-1-c of the
// sequence and all keys. Its rows must equal the full attention's rows; its
// dk/dv equal the full backward with dO zero on the other rows.
void cp_case(float dropout_p) {
  const int64_t S = 192, b = 2, np = 2, hn = 32, cp = 2, c = 1, chunk = S / (2 * cp);
  Inputs full(b, S, S, np, np, hn, 21);
  std::vector<int64_t> pos;
  for (int64_t t = 0; t < chunk; ++t) pos.push_back(c * chunk + t);
  for (int64_t t = 0; t < chunk; ++t) pos.push_back((2 * cp - 1 - c) * chunk + t);
  ref::RunContext ctx;
  if (dropout_p > 0) {
    ctx.training = true, ctx.seed = 1234, ctx.path = "decoder.layers.0.self_attention.core_attention";
    full.cfg.attention_dropout = dropout_p;
  }
  Mat dout_masked = Mat::Zero(full.dout.rows(), full.dout.cols());
  for (int64_t p : pos)
    for (int64_t e = 0; e < b; ++e) dout_masked.row(p * b + e) = full.dout.row(p * b + e);
  const Result want = run_ref(full.cfg, full.q, full.k, full.v, dout_masked, b, AttnMaskType::causal, std::nullopt, ctx);

  Inputs part(b, static_cast<int64_t>(pos.size()), S, np, np, hn);
  part.q = seq_rows(full.q, pos, b);
  part.k = full.k, part.v = full.v;
  part.dout = seq_rows(full.dout, pos, b);
  part.args.causal = true;
  part.args.q_positions = pos;
  part.args.sq_global = S, part.args.sk_global = S;
  part.args.dropout_p = dropout_p;
  part.args.dropout_key = ctx.key("dropout");
  const Result got = run_opt(part.args, part.q, part.k, part.v, part.dout);
  expect_close(got.out, seq_rows(want.out, pos, b), kTol, "out");
  expect_close(got.dq, seq_rows(want.dq, pos, b), kTol, "dq");
  expect_close(got.dk, want.dk, kTol, "dk");
  expect_close(got.dv, want.dv, kTol, "dv");
}

TEST(CpuAttention, ContextParallelRows) { cp_case(0.0f); }
TEST(CpuAttention, ContextParallelRowsWithDropout) { cp_case(0.25f); }

// Tensor parallelism: this rank holds heads 2, 3 of 4 (group 1 of 2). A
// per-head explicit mask and dropout index heads globally.
TEST(CpuAttention, TensorParallelHeadSlice) {
  const int64_t b = 2, S = 100, np = 4, ng = 2, hn = 16;
  Inputs full(b, S, S, np, ng, hn, 31);
  AttentionMask m(b, np, S, S);
  std::mt19937 gen(5);
  for (int64_t e = 0; e < b; ++e)
    for (int64_t h = 0; h < np; ++h)
      for (int64_t i = 0; i < S; ++i)
        for (int64_t j = 0; j < S; ++j) m.set(e, h, i, j, j > i || gen() % 4 == 0);
  ref::RunContext ctx;
  ctx.training = true, ctx.seed = 99, ctx.path = "decoder.layers.1.self_attention.core_attention";
  const float p = 0.2f;
  full.cfg.attention_dropout = p;
  const Result want = run_ref(full.cfg, full.q, full.k, full.v, full.dout, b, AttnMaskType::padding, m, ctx);

  Inputs part(b, S, S, 2, 1, hn);
  part.q = full.q.middleCols(2 * hn, 2 * hn);
  part.dout = full.dout.middleCols(2 * hn, 2 * hn);
  part.k = full.k.middleCols(hn, hn);
  part.v = full.v.middleCols(hn, hn);
  part.set_mask(m);
  part.args.softmax_scale = full.args.softmax_scale;
  part.args.head_offset = 2, part.args.heads_global = np;
  part.args.dropout_p = p;
  part.args.dropout_key = ctx.key("dropout");
  const Result got = run_opt(part.args, part.q, part.k, part.v, part.dout);
  expect_close(got.out, want.out.middleCols(2 * hn, 2 * hn), kTol, "out");
  expect_close(got.dq, want.dq.middleCols(2 * hn, 2 * hn), kTol, "dq");
  expect_close(got.dk, want.dk.middleCols(hn, hn), kTol, "dk");
  expect_close(got.dv, want.dv.middleCols(hn, hn), kTol, "dv");
}

TEST(CpuAttention, DropoutTraining) {
  Inputs s(2, 130, 130, 4, 2, 32, 41);
  ref::RunContext ctx;
  ctx.training = true, ctx.seed = 7, ctx.path = "decoder.layers.0.self_attention.core_attention";
  s.cfg.attention_dropout = 0.1f;  // the float the model passes, exactly
  s.args.dropout_p = 0.1f;
  s.args.dropout_key = ctx.key("dropout");
  s.args.causal = true;
  check_against_ref(s, AttnMaskType::causal, std::nullopt, ctx);
}

// Fewer (batch, group) pairs than threads (multi-query attention): the
// backward splits each pair's key tiles over tasks with private dq copies.
// Several thread counts (1: no split; 3, 4: uneven and even splits), with a
// last query tile that is not a multiple of the micro-kernel's rows (dq
// through the scratch tile) and dropout (the dropped-probabilities path).
TEST(CpuAttention, MultiQuerySplitKeysAcrossThreads) {
  const int saved = omp_get_max_threads();
  for (const int threads : {1, 3, 4}) {
    SCOPED_TRACE("threads = " + std::to_string(threads));
    omp_set_num_threads(threads);
    Inputs s(1, 198, 198, 4, 1, 64, 61);
    s.args.causal = true;
    check_against_ref(s, AttnMaskType::causal, std::nullopt);

    Inputs d(1, 150, 150, 2, 1, 128, 62);
    ref::RunContext ctx;
    ctx.training = true, ctx.seed = 9, ctx.path = "decoder.layers.0.self_attention.core_attention";
    d.cfg.attention_dropout = 0.2f;
    d.args.dropout_p = 0.2f;
    d.args.dropout_key = ctx.key("dropout");
    d.args.causal = true;
    check_against_ref(d, AttnMaskType::causal, std::nullopt, ctx);
  }
  omp_set_num_threads(saved);
}

// probs_dtype bf16 / fp16: P rounded after normalisation (and the dropout
// product rounded again), against the naive float64 contract. A P within an
// fp32 rounding of a 16-bit midpoint may round the other way, so the
// tolerance is the effect of one such flip.
TEST(CpuAttention, Bf16Probabilities) {
  for (const DType dt : {DType::BF16, DType::F16}) {
    for (const float p : {0.0f, 0.3f}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " p = " + std::to_string(p));
      Inputs s(1, 130, 130, 2, 1, 32, 51);
      s.args.causal = true;
      s.args.probs_dtype = dt;
      s.args.dropout_p = p;
      s.args.dropout_key = rng_key(5, "dropout.attention_test");
      const Result got = run_opt(s.args, s.q, s.k, s.v, s.dout);
      const Result want = run_naive(s.args, s.q, s.k, s.v, s.dout);
      compare_all(got, want, 2e-4);
      expect_close(got.lse, want.lse, kTol, "lse");
      // The rounding is visible: fp32 probabilities give another output.
      AttentionArgs f32 = s.args;
      f32.probs_dtype = DType::F32;
      const Result unrounded = run_naive(f32, s.q, s.k, s.v, s.dout);
      EXPECT_GT((want.out - unrounded.out).cwiseAbs().maxCoeff(), 1e-4);
    }
  }
}

// fp32 probabilities: the naive contract agrees with the reference
// (cross-checks the oracle used above).
TEST(CpuAttention, NaiveOracleMatchesReference) {
  Inputs s(1, 40, 40, 2, 1, 8, 61);
  s.args.causal = true;
  compare_all(run_naive(s.args, s.q, s.k, s.v, s.dout),
              run_ref(s.cfg, s.q, s.k, s.v, s.dout, 1, AttnMaskType::causal, std::nullopt), 1e-6);
}

TEST(CpuAttention, RejectsBadShapes) {
  AttentionArgs a;
  a.sq = 4, a.sk = 4, a.heads = 3, a.groups = 2, a.head_dim = 8;
  std::vector<float> x(1024);
  EXPECT_THROW(attention_forward(a, x.data(), x.data(), x.data(), x.data(), x.data()), Error);
}

}  // namespace
}  // namespace paritron::opt::cpu
