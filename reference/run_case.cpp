// See run_case.h. One runner per component of the case-format table: each
// maps the case's tensors onto the component's forward/backward and names the
// results as the case format does.
#include "reference/run_case.h"

#include <fmt/format.h>

#include <functional>

#include "common/error.h"
#include "common/module_params.h"
#include "reference/core.h"
#include "reference/cross_attention.h"
#include "reference/dot_product_attention.h"
#include "reference/masks.h"
#include "reference/mlp.h"
#include "reference/moe_layer.h"
#include "reference/moe_router.h"
#include "reference/norm.h"
#include "reference/rotary_pos_emb.h"
#include "reference/self_attention.h"
#include "reference/transformer_block.h"
#include "reference/transformer_layer.h"

namespace paritron::ref {
namespace {

// The parameters a case of this component may hold, with their shapes: the
// catalogue of common/module_params.h (local spec), plus what the catalogue
// leaves out: the cross-attention submodules a layer may have (encoder-decoder
// specs), the newer router.bias / router.expert_bias, and GroupedMLP's
// weight1 / weight2 in place of the per-expert linears.
std::map<std::string, Shape> allowed_weights(const std::string& component, const TransformerConfig& cfg) {
  std::map<std::string, Shape> allowed;
  if (component == "dot_product_attention" || component == "rotary_pos_emb") return allowed;
  const int64_t h = cfg.hidden_size;
  auto add_router_extras = [&](const std::string& prefix) {
    const int64_t experts = *cfg.num_moe_experts;
    allowed[prefix + "bias"] = {experts};
    allowed[prefix + "expert_bias"] = {experts};
  };
  if (component == "moe_router") {
    if (!cfg.num_moe_experts) return allowed;
    for (const ParamSpec& spec : module_params(component, cfg)) allowed[spec.key] = spec.shape;
    add_router_extras("");
    return allowed;
  }
  TransformerConfig plain = cfg;
  plain.moe_grouped_gemm = false;  // the catalogue lists per-expert linears
  const int64_t layers = component == "transformer_block" ? cfg.num_layers : 1;
  for (const ParamSpec& spec : module_params(component, plain)) {
    if (cfg.moe_grouped_gemm && spec.key.find("experts.local_experts.") != std::string::npos) continue;
    allowed[spec.key] = spec.shape;
  }
  for (int64_t l = 0; l < layers; ++l) {
    std::string layer = component == "transformer_block" ? fmt::format("layers.{}.", l) : "";
    std::string mlp = component == "moe_layer" ? "" : layer + "mlp.";
    if (cfg.num_moe_experts && component != "mlp") {
      add_router_extras(mlp + "router.");
      if (cfg.moe_grouped_gemm) {
        const int64_t e = *cfg.num_moe_experts, f = expert_ffn_hidden_size(cfg);
        allowed[mlp + "experts.weight1"] = {h, e * (cfg.gated_linear_unit ? 2 * f : f)};
        allowed[mlp + "experts.weight2"] = {e * f, h};
      }
    }
    if (component == "transformer_layer" || component == "transformer_block") {
      for (const ParamSpec& spec : cross_attention_layer_params(plain, layer)) allowed[spec.key] = spec.shape;
    }
  }
  return allowed;
}

// The case's tensors as the reference consumes them.
class CaseRun {
 public:
  CaseRun(const Case& c, const ReferenceOptions& options, ReferenceResult& result)
      : case_(c), result_(result), precision_(emulated_precision(options.dtype, c.config)) {
    if (options.dtype == DType::F64) precision_ = options.forced_fp32 ? truth_precision() : float64_math();
    const std::map<std::string, Shape> allowed = allowed_weights(c.component, c.config);
    for (const auto& [name, tensor] : c.tensors) {
      if (name.rfind("weights.", 0) != 0) continue;
      const std::string key = local_key(name.substr(8));
      auto spec = allowed.find(key);
      if (spec == allowed.end()) {
        throw Error(fmt::format("{} is not a parameter of {} under this config (a bias with add_bias_linear "
                                "false, a width the config does not give, or a misspelt key?)",
                                name, c.component));
      }
      if (tensor.shape() != spec->second) {
        throw Error(fmt::format("{} has shape {}, the config gives {}", name, shape_string(tensor.shape()),
                                shape_string(spec->second)));
      }
      if (weights_.count(key)) throw Error(fmt::format("{} is given twice (under its local and its TE name)", key));
      weights_[key] = rounded(to_mat(tensor), precision_.dtype);
      weight_shapes_[key] = {name, tensor.shape()};
    }
    backward_ = options.backward && has_input("grad_output");
    if (options.backward && !backward_) result_.notes.push_back("no inputs.grad_output: backward not run");
    context_.training = c.training;
    context_.seed = c.seed.value_or(0);
    context_.layer_number = c.layer_number;
  }

  const TransformerConfig& config() const { return case_.config; }
  const Precision& precision() const { return precision_; }
  const RunContext& context() const { return context_; }
  Params weights() const { return Params(weights_); }
  Sink grads() { return Sink(weight_grads_); }
  Sink taps() { return Sink(taps_); }
  bool backward() const { return backward_; }

  bool has_input(const std::string& name) const { return case_.tensors.count("inputs." + name) > 0; }
  const Tensor& input_tensor(const std::string& name) const {
    auto it = case_.tensors.find("inputs." + name);
    if (it == case_.tensors.end()) throw Error(fmt::format("the case has no inputs.{}", name));
    return it->second;
  }
  // An input as rows of its last dimension, rounded to the emulated dtype.
  Mat input(const std::string& name) const { return rounded(to_mat(input_tensor(name)), precision_.dtype); }
  // The [s, b, h] input `name`: checks the rank and the hidden size.
  Mat hidden(const std::string& name, int64_t* s = nullptr, int64_t* b = nullptr) const {
    const Tensor& t = input_tensor(name);
    if (t.dim() != 3 || t.shape()[2] != case_.config.hidden_size) {
      throw Error(fmt::format("inputs.{} has shape {}, expected [s, b, hidden_size = {}]", name,
                              shape_string(t.shape()), case_.config.hidden_size));
    }
    if (s) *s = t.shape()[0];
    if (b) *b = t.shape()[1];
    return input(name);
  }
  // grad_<output> for an output of the given shape, checked.
  Mat output_grad(const std::string& name, const Shape& shape) const {
    const Tensor& t = input_tensor(name);
    if (t.shape() != shape) {
      throw Error(fmt::format("inputs.{} has shape {}, expected {} (the shape of its output)", name,
                              shape_string(t.shape()), shape_string(shape)));
    }
    return input(name);
  }

  void output(const std::string& name, const Mat& value, const Shape& shape, DType dtype = DType::F64) {
    result_.tensors["outputs." + name] = to_tensor(value, shape, dtype);
  }
  const Case& the_case() const { return case_; }
  // An optional boolean mask input (true = masked out).
  std::optional<AttentionMask> mask(const std::string& name) const {
    if (!has_input(name)) return std::nullopt;
    return AttentionMask::from_tensor(input_tensor(name), "inputs." + name);
  }
  // inputs.rotary_pos_emb [s, 1, 1, rot_dim] as the [s, rot_dim] angle table.
  // RotaryEmbedding always makes float32 angles and the attention takes cos/sin
  // in that dtype; a table with values float32 cannot hold is refused rather
  // than silently rounded.
  std::optional<Mat> rotary(int64_t s) const {
    if (!has_input("rotary_pos_emb")) return std::nullopt;
    const Tensor& t = input_tensor("rotary_pos_emb");
    if (t.dim() != 4 || t.shape()[0] != s || t.shape()[1] != 1 || t.shape()[2] != 1) {
      throw Error(fmt::format("inputs.rotary_pos_emb has shape {}, expected [{}, 1, 1, rot_dim]",
                              shape_string(t.shape()), s));
    }
    const Mat angles = to_mat(t);
    if (angles != rounded(angles, DType::F32)) {
      throw Error("inputs.rotary_pos_emb holds values that are not float32 numbers; RotaryEmbedding's angles are "
                  "float32 (store them as F32)");
    }
    return angles;
  }
  void input_grad(const std::string& name, const Mat& value) {
    result_.tensors["grads.inputs." + name] = to_tensor(value, input_tensor(name).shape());
  }

  // Weight gradients and taps into the result, under the names the case uses.
  void finish() {
    for (const auto& [key, grad] : weight_grads_) {
      auto it = weight_shapes_.find(key);
      if (it == weight_shapes_.end()) continue;  // a gradient of a parameter the case does not hold
      result_.tensors["grads." + it->second.first] = to_tensor(grad, it->second.second);
    }
    for (const auto& [path, tap] : taps_) {
      result_.tensors["outputs.intermediate." + path] = tap_tensor(path, tap);
    }
  }

  // Taps are stored as [rows, cols] Mats; a tap whose name the case holds
  // takes that tensor's shape, others keep the 2-D shape.
  Tensor tap_tensor(const std::string& path, const Mat& tap) const {
    auto it = case_.tensors.find("outputs.intermediate." + path);
    if (it != case_.tensors.end() && it->second.numel() == tap.size()) return to_tensor(tap, it->second.shape());
    if (auto shape = tap_shapes_.find(path); shape != tap_shapes_.end()) return to_tensor(tap, shape->second);
    return to_tensor(tap, {tap.rows(), tap.cols()});
  }
  void tap_shape(const std::string& path, Shape shape) { tap_shapes_[path] = std::move(shape); }

 private:
  static std::string local_key(const std::string& key) {
    // Cases written with the Transformer Engine spec's norm keys load too.
    for (const auto& [te, local] : kTeNormKeyPrefixes) {
      const size_t at = key.find(te);
      if (at != std::string::npos) return key.substr(0, at) + std::string(local) + key.substr(at + te.size());
    }
    return key;
  }

  const Case& case_;
  ReferenceResult& result_;
  Precision precision_;
  RunContext context_;
  bool backward_ = false;
  MatMap weights_, weight_grads_, taps_;
  std::map<std::string, std::pair<std::string, Shape>> weight_shapes_;  // local key -> (case name, shape)
  std::map<std::string, Shape> tap_shapes_;
};

// ---------------------------------------------------------------------------

void run_norm(CaseRun& run, bool rms) {
  int64_t s = 0, b = 0;
  const Mat x = run.hidden("hidden_states", &s, &b);
  const auto& cfg = run.config();
  const Shape shape{s, b, cfg.hidden_size};
  const NormForward f = rms ? rmsnorm_forward(cfg, run.weights(), x, run.precision())
                            : layernorm_forward(cfg, run.weights(), x, run.precision());
  run.output("output", f.output, shape);
  if (!run.backward()) return;
  const Mat dy = run.output_grad("grad_output", shape);
  const Mat dx = rms ? rmsnorm_backward(cfg, run.weights(), x, f, dy, run.grads(), run.precision())
                     : layernorm_backward(cfg, run.weights(), x, f, dy, run.grads(), run.precision());
  run.input_grad("hidden_states", dx);
}

void run_rotary_pos_emb(CaseRun& run) {
  const Tensor& t = run.input_tensor("t");
  const Tensor& freqs = run.input_tensor("freqs");
  if (t.dim() != 4) throw Error(fmt::format("inputs.t has shape {}, expected [s, b, heads, d]", shape_string(t.shape())));
  const int64_t s = t.shape()[0], b = t.shape()[1], heads = t.shape()[2], d = t.shape()[3];
  if (freqs.dim() != 4 || freqs.shape()[0] != s || freqs.shape()[1] != 1 || freqs.shape()[2] != 1 ||
      freqs.shape()[3] > d || freqs.shape()[3] % 2 != 0) {
    throw Error(fmt::format("inputs.freqs has shape {}, expected [{}, 1, 1, rot_dim] with an even rot_dim <= {}",
                            shape_string(freqs.shape()), s, d));
  }
  const Mat x = run.input("t");
  // cos/sin are taken in the dtype of freqs (float32 from RotaryEmbedding), spec §5.2.
  const Mat angles = to_mat(freqs);
  const DType freqs_dtype = freqs.dtype();
  const bool interleaved = run.config().rotary_interleaved;
  const Mat y = apply_rotary_pos_emb_forward(x.reshaped<Eigen::RowMajor>(s * b, heads * d), b, heads, angles,
                                             interleaved, run.precision(), freqs_dtype);
  run.output("output", y, t.shape());
  if (!run.backward()) return;
  const Mat dy = run.output_grad("grad_output", t.shape());
  const Mat dx = apply_rotary_pos_emb_backward(dy.reshaped<Eigen::RowMajor>(s * b, heads * d), b, heads, angles,
                                               interleaved, run.precision(), freqs_dtype);
  run.input_grad("t", dx);
}

// inputs.grad_output_bias for a [h] output_bias, when the case has it.
std::optional<RowVec> bias_grad(const CaseRun& run, bool has_bias) {
  if (!has_bias || !run.has_input("grad_output_bias")) return std::nullopt;
  return RowVec(run.output_grad("grad_output_bias", {run.config().hidden_size}).row(0));
}

void run_mlp(CaseRun& run) {
  int64_t s = 0, b = 0;
  const Mat x = run.hidden("hidden_states", &s, &b);
  const auto& cfg = run.config();
  const Shape shape{s, b, cfg.hidden_size};
  const MlpForward f = mlp_forward(cfg, run.weights(), x, run.precision());
  run.taps().put("linear_fc1", f.fc1_output);  // pre-activations (the parity harness's kink near-ties)
  run.output("output", f.output, shape);
  if (f.output_bias) run.output("output_bias", *f.output_bias, {cfg.hidden_size});
  if (!run.backward()) return;
  const Mat dy = run.output_grad("grad_output", shape);
  run.input_grad("hidden_states", mlp_backward(cfg, run.weights(), x, f, dy, bias_grad(run, f.output_bias.has_value()),
                                               run.grads(), run.precision()));
}

// [s, b, heads, hn] -> the Mat of s*b rows, checking heads * hn.
Mat heads_input(const CaseRun& run, const std::string& name, int64_t heads, int64_t hn, int64_t* s, int64_t* b) {
  const Tensor& t = run.input_tensor(name);
  if (t.dim() != 4 || t.shape()[2] != heads || t.shape()[3] != hn) {
    throw Error(fmt::format("inputs.{} has shape {}, expected [s, b, {}, {}]", name, shape_string(t.shape()), heads, hn));
  }
  *s = t.shape()[0];
  *b = t.shape()[1];
  return run.input(name).reshaped<Eigen::RowMajor>(*s * *b, heads * hn);
}

void run_dot_product_attention(CaseRun& run) {
  const auto& cfg = run.config();
  const AttentionDims d = attention_dims(cfg);
  int64_t sq = 0, b = 0, sk = 0, bk = 0, sv = 0, bv = 0;
  const Mat q = heads_input(run, "query", d.np, d.hn, &sq, &b);
  const Mat k = heads_input(run, "key", d.ng, d.hn, &sk, &bk);
  const Mat v = heads_input(run, "value", d.ng, d.hn, &sv, &bv);
  if (bk != b || bv != b || sv != sk) {
    throw Error(fmt::format("inputs.key/value are [{}, {}] / [{}, {}] in (s, b), inputs.query has b = {}", sk, bk, sv,
                            bv, b));
  }
  const DotProductAttentionForward f = dot_product_attention_forward(
      cfg, q, k, v, b, attn_mask_type_from_string(run.the_case().attn_mask_type), run.mask("attention_mask"),
      run.precision(), run.context().sub("core_attention"), run.taps());
  const Shape shape{sq, b, d.np * d.hn};
  run.output("output", f.output, shape);
  if (!run.backward()) return;
  const DotProductAttentionGrads g =
      dot_product_attention_backward(cfg, q, k, v, f, run.output_grad("grad_output", shape), run.precision());
  run.input_grad("query", g.d_query);
  run.input_grad("key", g.d_key);
  run.input_grad("value", g.d_value);
}


void run_self_attention(CaseRun& run) {
  const auto& cfg = run.config();
  int64_t s = 0, b = 0;
  const Mat x = run.hidden("hidden_states", &s, &b);
  const std::optional<Mat> rope = run.rotary(s);
  const SelfAttentionForward f = self_attention_forward(
      cfg, run.weights(), x, b, attn_mask_type_from_string(run.the_case().attn_mask_type), run.mask("attention_mask"),
      rope, run.precision(), run.context(), run.taps());
  const Shape shape{s, b, cfg.hidden_size};
  run.output("output", f.output, shape);
  if (f.output_bias) run.output("output_bias", *f.output_bias, {cfg.hidden_size});
  if (!run.backward()) return;
  const Mat dx = self_attention_backward(cfg, run.weights(), x, b, rope, f, run.output_grad("grad_output", shape),
                                         bias_grad(run, f.output_bias.has_value()), run.grads(), run.precision());
  run.input_grad("hidden_states", dx);
}

void run_cross_attention(CaseRun& run) {
  const auto& cfg = run.config();
  int64_t s = 0, b = 0, sk = 0, bk = 0;
  const Mat x = run.hidden("hidden_states", &s, &b);
  const Mat kv = run.hidden("key_value_states", &sk, &bk);
  if (bk != b) throw Error(fmt::format("inputs.key_value_states has b = {}, inputs.hidden_states b = {}", bk, b));
  // CrossAttention's default mask type is padding; the case's metadata, when given, wins.
  const Case& c = run.the_case();
  const AttnMaskType mask_type =
      c.attn_mask_type_given ? attn_mask_type_from_string(c.attn_mask_type) : AttnMaskType::padding;
  const CrossAttentionForward f = cross_attention_forward(
      cfg, run.weights(), x, kv, b, mask_type,
      run.mask("attention_mask"), run.precision(), run.context(), run.taps());
  const Shape shape{s, b, cfg.hidden_size};
  run.output("output", f.output, shape);
  if (f.output_bias) run.output("output_bias", *f.output_bias, {cfg.hidden_size});
  if (!run.backward()) return;
  const CrossAttentionGrads g =
      cross_attention_backward(cfg, run.weights(), x, kv, b, f, run.output_grad("grad_output", shape),
                               bias_grad(run, f.output_bias.has_value()), run.grads(), run.precision());
  run.input_grad("hidden_states", g.d_hidden_states);
  run.input_grad("key_value_states", g.d_key_value_states);
}

Mat index_mat(const IndexMat& m) { return m.cast<double>(); }

Mat counts_mat(const std::vector<int64_t>& v) {
  Mat m(1, static_cast<Eigen::Index>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) m(0, static_cast<Eigen::Index>(i)) = static_cast<double>(v[i]);
  return m;
}

void router_outputs(CaseRun& run, const RouterForward& r) {
  const int64_t tokens = r.logits.rows(), experts = r.logits.cols(), k = r.scores.cols();
  run.output("router_logits", r.logits, {tokens, experts});
  if (r.probs) run.output("router_probs", *r.probs, {tokens, experts});
  run.output("router_scores", r.scores, {tokens, k});
  run.output("router_indices", index_mat(r.indices), {tokens, k}, DType::I64);
  run.output("tokens_per_expert", counts_mat(r.tokens_per_expert), {experts}, DType::I64);
  if (r.aux_loss) run.output("aux_loss", Mat::Constant(1, 1, *r.aux_loss), {});
  if (r.z_loss) run.output("z_loss", Mat::Constant(1, 1, *r.z_loss), {});
}

// moe_router: the case's inputs.grad_output is the gradient of router_scores
// [T, k] (the router's main result; reference/README.md documents the row).
void run_moe_router(CaseRun& run) {
  const auto& cfg = run.config();
  int64_t s = 0, b = 0;
  const Mat x = run.hidden("hidden_states", &s, &b);
  const RouterForward f = moe_router_forward(cfg, run.weights(), x, run.precision(), run.context());
  router_outputs(run, f);
  // The router's logits and decision margins as taps, as moe_layer records
  // them (the parity harness's near-tie handling reads them).
  const Sink rt = run.taps().sub("router");
  rt.put("logits", f.logits);
  rt.put("topk_margin", f.topk_margin);
  rt.put("order_margin", f.order_margin);
  rt.put("capacity_margin", f.capacity_margin);
  rt.put("selection", f.selection_values);
  if (!run.backward()) return;
  const Mat d_scores = run.output_grad("grad_output", {f.scores.rows(), f.scores.cols()});
  const Mat dx = moe_router_backward(cfg, run.weights(), x, f, d_scores, run.grads(), run.precision());
  run.input_grad("hidden_states", dx);
}

void run_moe_layer(CaseRun& run) {
  const auto& cfg = run.config();
  int64_t s = 0, b = 0;
  const Mat x = run.hidden("hidden_states", &s, &b);
  const MoeLayerForward f = moe_layer_forward(cfg, run.weights(), x, run.precision(), run.context(), run.taps());
  const Shape shape{s, b, cfg.hidden_size};
  run.output("output", f.output, shape);
  if (f.output_bias) run.output("output_bias", *f.output_bias, shape);
  router_outputs(run, f.router);
  if (!run.backward()) return;
  std::optional<Mat> d_bias;
  if (f.output_bias && run.has_input("grad_output_bias")) d_bias = run.output_grad("grad_output_bias", shape);
  const Mat dx = moe_layer_backward(cfg, run.weights(), x, f, run.output_grad("grad_output", shape), d_bias,
                                    run.grads(), run.precision());
  run.input_grad("hidden_states", dx);
}

LayerInputs layer_inputs(const CaseRun& run, int64_t s, int64_t b) {
  LayerInputs in;
  in.b = b;
  in.self_attn_mask_type = attn_mask_type_from_string(run.the_case().attn_mask_type);
  in.attention_mask = run.mask("attention_mask");
  if (run.has_input("context")) {
    int64_t sk = 0, bk = 0;
    in.context = run.hidden("context", &sk, &bk);
    if (bk != b) throw Error(fmt::format("inputs.context has b = {}, inputs.hidden_states b = {}", bk, b));
  }
  in.context_mask = run.mask("context_mask");
  in.rotary_pos_emb = run.rotary(s);
  return in;
}

void run_transformer_layer(CaseRun& run) {
  const auto& cfg = run.config();
  int64_t s = 0, b = 0;
  const Mat x = run.hidden("hidden_states", &s, &b);
  const LayerInputs in = layer_inputs(run, s, b);
  const TransformerLayerForward f =
      transformer_layer_forward(cfg, run.weights(), x, in, run.precision(), run.context(), run.taps());
  const Shape shape{s, b, cfg.hidden_size};
  run.output("output", f.output, shape);
  if (!run.backward()) return;
  const TransformerLayerGrads g = transformer_layer_backward(cfg, run.weights(), in, f,
                                                             run.output_grad("grad_output", shape), run.grads(),
                                                             run.precision());
  run.input_grad("hidden_states", g.hidden_states);
  if (g.context && run.has_input("context")) run.input_grad("context", *g.context);
}

// A block case holds the layers of one pipeline stage: as many as it has
// "layers.<i>." weights, the first being global layer `layer_number`
// (metadata, default 1); the final norm runs when its weights are present.
void run_transformer_block(CaseRun& run) {
  const auto& cfg = run.config();
  int64_t s = 0, b = 0;
  const Mat x = run.hidden("hidden_states", &s, &b);
  const LayerInputs in = layer_inputs(run, s, b);
  BlockStage stage;
  while (layer_spec_for(run.weights().sub(fmt::format("layers.{}", stage.num_layers))).any()) ++stage.num_layers;
  if (stage.num_layers == 0) throw Error("a transformer_block case needs weights.layers.0.*");
  stage.layer_offset = run.the_case().layer_number - 1;
  if (stage.layer_offset + stage.num_layers > cfg.num_layers) {
    throw Error(fmt::format("the case holds {} layers starting at layer_number {}, but num_layers is {}",
                            stage.num_layers, run.the_case().layer_number, cfg.num_layers));
  }
  const TransformerBlockForward f =
      transformer_block_forward(cfg, run.weights(), x, in, stage, run.precision(), run.context(), run.taps());
  const Shape shape{s, b, cfg.hidden_size};
  run.output("output", f.output, shape);
  for (int64_t i = 0; i < stage.num_layers; ++i) run.tap_shape(fmt::format("layers.{}", i), shape);
  if (!run.backward()) return;
  const TransformerLayerGrads g = transformer_block_backward(cfg, run.weights(), in, stage, f,
                                                             run.output_grad("grad_output", shape), run.grads(),
                                                             run.precision());
  run.input_grad("hidden_states", g.hidden_states);
  if (g.context && run.has_input("context")) run.input_grad("context", *g.context);
}

using Runner = std::function<void(CaseRun&)>;

const std::map<std::string, Runner, std::less<>>& runners() {
  static const std::map<std::string, Runner, std::less<>> table = {
      {"layernorm", [](CaseRun& r) { run_norm(r, false); }},
      {"rmsnorm", [](CaseRun& r) { run_norm(r, true); }},
      {"rotary_pos_emb", run_rotary_pos_emb},
      {"mlp", run_mlp},
      {"dot_product_attention", run_dot_product_attention},
      {"self_attention", run_self_attention},
      {"cross_attention", run_cross_attention},
      {"moe_router", run_moe_router},
      {"moe_layer", run_moe_layer},
      {"transformer_layer", run_transformer_layer},
      {"transformer_block", run_transformer_block},
  };
  return table;
}

}  // namespace

ReferenceResult run_reference(const Case& c, const ReferenceOptions& options) {
  auto it = runners().find(c.component);
  if (it == runners().end()) {
    throw Error(fmt::format("the reference cannot run component '{}'", c.component));
  }
  ReferenceResult result;
  CaseRun run(c, options, result);
  it->second(run);
  run.finish();
  return result;
}

}  // namespace paritron::ref
