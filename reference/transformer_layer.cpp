// See transformer_layer.h.
#include "reference/transformer_layer.h"

#include <fmt/format.h>

#include <functional>
#include <string_view>

#include "common/error.h"

namespace paritron::ref {
namespace {

bool has_module(const Params& w, std::string_view module, std::initializer_list<std::string_view> keys) {
  for (auto key : keys) {
    if (w.sub(module).has(key)) return true;
  }
  return false;
}

std::optional<Mat> as_bias(const std::optional<RowVec>& b) {
  if (!b) return std::nullopt;
  return Mat(*b);
}

// The d(output_bias) a [h] bias receives from bda: its column-sum gradient.
std::optional<RowVec> as_row(const std::optional<Mat>& g) {
  if (!g) return std::nullopt;
  return RowVec(g->row(0));
}

}  // namespace

LayerSpec layer_spec_for(const Params& w) {
  LayerSpec s;
  s.input_layernorm = has_module(w, "input_layernorm", {"weight"});
  s.self_attention = has_module(w, "self_attention", {"linear_qkv.weight", "linear_proj.weight"});
  s.pre_cross_attn_layernorm = has_module(w, "pre_cross_attn_layernorm", {"weight"});
  s.cross_attention = has_module(w, "cross_attention", {"linear_q.weight", "linear_kv.weight"});
  s.pre_mlp_layernorm = has_module(w, "pre_mlp_layernorm", {"weight"});
  s.mlp = has_module(w, "mlp", {"linear_fc1.weight", "router.weight"});
  return s;
}

TransformerLayerForward transformer_layer_forward(const TransformerConfig& cfg, const Params& w, const Mat& x,
                                                  const LayerInputs& in, const Precision& p, const RunContext& ctx,
                                                  const Sink& taps) {
  TransformerLayerForward f;
  f.spec = layer_spec_for(w);
  f.input = x;
  const double hidden_dropout = cfg.hidden_dropout;

  // Self-attention block.
  Mat hidden = x;
  if (f.spec.input_layernorm) {
    f.input_layernorm = norm_forward(cfg, w.sub("input_layernorm"), hidden, p);
    taps.put("input_layernorm", f.input_layernorm->output);
  }
  if (f.spec.self_attention) {
    const Mat& a = f.input_layernorm ? f.input_layernorm->output : hidden;
    f.self_attention = self_attention_forward(cfg, w.sub("self_attention"), a, in.b, in.self_attn_mask_type,
                                              in.attention_mask, in.rotary_pos_emb, p, ctx.sub("self_attention"),
                                              taps.sub("self_attention"));
    taps.put("self_attention.output", f.self_attention->output);
    if (f.self_attention->output_bias) taps.put("self_attention.output_bias", *f.self_attention->output_bias);
    f.self_attn_bda = bias_dropout_add_forward(f.self_attention->output, as_bias(f.self_attention->output_bias),
                                               hidden, hidden_dropout, ctx, "self_attn_bda", p);
    hidden = f.self_attn_bda->output;
    taps.put("self_attn_bda", hidden);
  } else if (f.input_layernorm) {
    // IdentityOp attention returns the normed input; IdentityFuncOp bda passes it through.
    hidden = f.input_layernorm->output;
  }
  f.after_self_attention = hidden;

  // Cross-attention block (identity in the GPT specs).
  if (f.spec.pre_cross_attn_layernorm) {
    f.pre_cross_attn_layernorm = norm_forward(cfg, w.sub("pre_cross_attn_layernorm"), hidden, p);
    taps.put("pre_cross_attn_layernorm", f.pre_cross_attn_layernorm->output);
  }
  if (f.spec.cross_attention) {
    if (!in.context) throw Error("the layer has cross_attention weights but no context (inputs.context) was given");
    const Mat& c = f.pre_cross_attn_layernorm ? f.pre_cross_attn_layernorm->output : hidden;
    f.cross_attention = cross_attention_forward(cfg, w.sub("cross_attention"), c, *in.context, in.b,
                                                in.cross_attn_mask_type, in.context_mask, p,
                                                ctx.sub("cross_attention"), taps.sub("cross_attention"));
    taps.put("cross_attention.output", f.cross_attention->output);
    f.cross_attn_bda = bias_dropout_add_forward(f.cross_attention->output, as_bias(f.cross_attention->output_bias),
                                                hidden, hidden_dropout, ctx, "cross_attn_bda", p);
    hidden = f.cross_attn_bda->output;
    taps.put("cross_attn_bda", hidden);
  } else if (f.pre_cross_attn_layernorm) {
    hidden = f.pre_cross_attn_layernorm->output;
  }
  f.after_cross_attention = hidden;

  // MLP / MoE block.
  if (f.spec.pre_mlp_layernorm) {
    f.pre_mlp_layernorm = norm_forward(cfg, w.sub("pre_mlp_layernorm"), hidden, p);
    taps.put("pre_mlp_layernorm", f.pre_mlp_layernorm->output);
  }
  if (f.spec.mlp) {
    const Mat& m = f.pre_mlp_layernorm ? f.pre_mlp_layernorm->output : hidden;
    Mat out;
    std::optional<Mat> out_bias;
    if (cfg.num_moe_experts) {
      f.moe = moe_layer_forward(cfg, w.sub("mlp"), m, p, ctx.sub("mlp"), taps.sub("mlp"));
      out = f.moe->output;
      out_bias = f.moe->output_bias;
    } else {
      f.mlp = mlp_forward(cfg, w.sub("mlp"), m, p);
      taps.put("mlp.linear_fc1", f.mlp->fc1_output);  // pre-activations (the parity harness's kink near-ties)
      out = f.mlp->output;
      out_bias = as_bias(f.mlp->output_bias);
    }
    taps.put("mlp.output", out);
    if (out_bias) taps.put("mlp.output_bias", *out_bias);
    f.mlp_bda = bias_dropout_add_forward(out, out_bias, hidden, hidden_dropout, ctx, "mlp_bda", p);
    hidden = f.mlp_bda->output;
    taps.put("mlp_bda", hidden);
  } else if (f.pre_mlp_layernorm) {
    hidden = f.pre_mlp_layernorm->output;
  }
  f.output = hidden;
  return f;
}

namespace {

// The backward of one sub-block, out = residual + dropout(module(norm(residual)) + bias),
// or of its identity forms (no module: out = norm(residual); neither: out = residual).
// `module_backward` takes the gradient reaching the module's (output, bias) and
// returns the gradient of the module's input. Returns d(residual).
struct SubBlock {
  std::string_view norm_name;                  // "input_layernorm", ...
  const std::optional<NormForward>* norm;      // its forward, when the norm exists
  const BiasDropoutAddForward* bda;            // null when the module is IdentityOp
  std::optional<Mat> bias;                     // the module's returned bias
};

Mat sub_block_backward(const TransformerConfig& cfg, const Params& w, const Mat& residual, const SubBlock& b,
                       const Mat& d_out, const Sink& grads, const Precision& p,
                       const std::function<Mat(const Mat&, const std::optional<Mat>&)>& module_backward) {
  Mat d_residual, d_norm_out;
  if (b.bda) {
    const BiasDropoutAddGrads bda = bias_dropout_add_backward(*b.bda, b.bias, d_out, p);
    d_norm_out = module_backward(bda.x, bda.bias);
    d_residual = bda.residual;
  } else {
    d_norm_out = d_out;  // IdentityOp module, IdentityFuncOp bda: no residual branch
    d_residual = Mat::Zero(d_out.rows(), d_out.cols());
  }
  if (*b.norm) {
    d_residual += norm_backward(cfg, w.sub(b.norm_name), residual, **b.norm, d_norm_out, grads.sub(b.norm_name), p);
  } else {
    d_residual += d_norm_out;
  }
  round_inplace(d_residual, p.dtype);
  return d_residual;
}

}  // namespace

TransformerLayerGrads transformer_layer_backward(const TransformerConfig& cfg, const Params& w,
                                                 const LayerInputs& in, const TransformerLayerForward& f,
                                                 const Mat& d_output, const Sink& grads, const Precision& p) {
  TransformerLayerGrads g;
  Mat d_hidden = d_output;

  // MLP / MoE block.
  {
    const Mat& residual = f.after_cross_attention;
    const Mat& m = f.pre_mlp_layernorm ? f.pre_mlp_layernorm->output : residual;
    SubBlock b{"pre_mlp_layernorm", &f.pre_mlp_layernorm, f.mlp_bda ? &*f.mlp_bda : nullptr, std::nullopt};
    if (f.spec.mlp) b.bias = f.moe ? f.moe->output_bias : as_bias(f.mlp->output_bias);
    d_hidden = sub_block_backward(cfg, w, residual, b, d_hidden, grads, p, [&](const Mat& dx, const std::optional<Mat>& db) {
      return f.moe ? moe_layer_backward(cfg, w.sub("mlp"), m, *f.moe, dx, db, grads.sub("mlp"), p)
                   : mlp_backward(cfg, w.sub("mlp"), m, *f.mlp, dx, as_row(db), grads.sub("mlp"), p);
    });
  }

  // Cross-attention block (absent in the GPT specs: nothing to do).
  if (f.spec.cross_attention || f.pre_cross_attn_layernorm) {
    const Mat& residual = f.after_self_attention;
    const Mat& c = f.pre_cross_attn_layernorm ? f.pre_cross_attn_layernorm->output : residual;
    SubBlock b{"pre_cross_attn_layernorm", &f.pre_cross_attn_layernorm, f.cross_attn_bda ? &*f.cross_attn_bda : nullptr,
               std::nullopt};
    if (f.spec.cross_attention) b.bias = as_bias(f.cross_attention->output_bias);
    d_hidden = sub_block_backward(cfg, w, residual, b, d_hidden, grads, p, [&](const Mat& dx, const std::optional<Mat>& db) {
      const CrossAttentionGrads cg = cross_attention_backward(cfg, w.sub("cross_attention"), c, *in.context, in.b,
                                                              *f.cross_attention, dx, as_row(db),
                                                              grads.sub("cross_attention"), p);
      g.context = cg.d_key_value_states;
      return cg.d_hidden_states;
    });
  }

  // Self-attention block.
  {
    const Mat& residual = f.input;
    const Mat& a = f.input_layernorm ? f.input_layernorm->output : residual;
    SubBlock b{"input_layernorm", &f.input_layernorm, f.self_attn_bda ? &*f.self_attn_bda : nullptr, std::nullopt};
    if (f.spec.self_attention) b.bias = as_bias(f.self_attention->output_bias);
    d_hidden = sub_block_backward(cfg, w, residual, b, d_hidden, grads, p, [&](const Mat& dx, const std::optional<Mat>& db) {
      return self_attention_backward(cfg, w.sub("self_attention"), a, in.b, in.rotary_pos_emb, *f.self_attention, dx,
                                     as_row(db), grads.sub("self_attention"), p);
    });
  }
  g.hidden_states = d_hidden;
  return g;
}

}  // namespace paritron::ref
