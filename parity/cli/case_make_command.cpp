// `paritron case make`: writes a case file for a component and a config, with
// weights and inputs drawn from the counter-based RNG and outputs (and
// gradients) from the float64 reference (reference/make_case.h). The case
// replays with `paritron check`; the same seed gives the same bytes.
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "common/case_file.h"
#include "common/config_json.h"
#include "common/file_io.h"
#include "parity/cli/commands.h"
#include "reference/make_case.h"

namespace paritron::cli {
namespace {

struct MakeOptions {
  std::string config_file, output, dtype = "F64";
  ref::MakeCaseOptions make;
  bool no_backward = false, no_taps = false;
};

int make(MakeOptions& o) {
  o.make.config = config_from_json_text(read_text_file(o.config_file)).config;
  o.make.backward = !o.no_backward;
  o.make.taps = !o.no_taps;
  o.make.dtype = o.dtype == "F32" ? DType::F32 : DType::F64;
  const Case c = ref::make_case(o.make);
  write_case(o.output, c);
  std::cout << fmt::format("wrote {} ({} tensors, component {}, seed {})\n", o.output, c.tensors.size(), c.component,
                           o.make.seed);
  return kExitOk;
}

}  // namespace

void register_case_make(CLI::App& group, Action& action) {
  auto o = std::make_shared<MakeOptions>();
  std::vector<std::string> components(case_components().begin(), case_components().end());
  CLI::App* cmd = group.add_subcommand(
      "make", "Write a case file: weights and inputs from the counter-based RNG, outputs and gradients from the "
              "float64 reference");
  cmd->add_option("--component", o->make.component, "component (case-format table)")
      ->required()
      ->check(CLI::IsMember(components));
  cmd->add_option("--config", o->config_file, "TransformerConfig JSON (Megatron field names)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("-o,--output", o->output, "case file to write")->required();
  cmd->add_option("--seed", o->make.seed, "RNG seed")->capture_default_str();
  cmd->add_option("--seq", o->make.seq_length, "sequence length s")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--kv-seq", o->make.kv_seq_length, "key/value (context) length for cross attention (default: s)");
  cmd->add_option("--batch", o->make.micro_batch_size, "micro-batch size b")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--mask", o->make.attn_mask_type,
                  "attn_mask_type (default: the module's own: padding for cross_attention, else causal)")
      ->check(CLI::IsMember({"causal", "padding", "no_mask"}));
  cmd->add_flag("--explicit-mask", o->make.explicit_mask, "pass the causal mask as inputs.attention_mask");
  cmd->add_flag("--rotary", o->make.rotary, "pass inputs.rotary_pos_emb (RoPE angles from the config)");
  cmd->add_flag("--cross-attention", o->make.cross_attention,
                "layer/block: add cross-attention submodules and inputs.context");
  cmd->add_flag("--training", o->make.training, "training mode (dropout from the counter-based RNG, sinkhorn)");
  cmd->add_flag("--no-backward", o->no_backward, "forward only: no grad_output inputs, no grads.*");
  cmd->add_flag("--no-taps", o->no_taps, "leave out outputs.intermediate.*");
  cmd->add_option("--weights", o->make.weights,
                  "random: every parameter drawn (biases too); megatron: Megatron's init (biases 0, norms 1)")
      ->capture_default_str()
      ->check(CLI::IsMember({"random", "megatron"}));
  cmd->add_option("--dtype", o->dtype, "dtype the tensors are stored in")
      ->capture_default_str()
      ->check(CLI::IsMember({"F64", "F32"}));
  cmd->add_option("--layer-number", o->make.layer_number, "layer_number metadata (1-based)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([&action, o] { action = [o] { return make(*o); }; });
}

}  // namespace paritron::cli
