// `paritron case inspect FILE`: what a case file holds — its metadata, its
// config, and every tensor with dtype, shape, min/max/mean and NaN/Inf
// counts — in text or (--json) as JSON. --raw inspects any safetensors file
// without requiring it to be a valid case.
#include <cmath>
#include <iostream>
#include <limits>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/case_file.h"
#include "common/safetensors.h"
#include "common/transformer_config.h"
#include "parity/cli/commands.h"

namespace paritron::cli {

namespace {

struct InspectOptions {
  std::string file;
  bool json = false;
  bool raw = false;
  bool full_config = false;
};

struct TensorStats {
  double min = std::numeric_limits<double>::quiet_NaN();
  double max = std::numeric_limits<double>::quiet_NaN();
  double mean = std::numeric_limits<double>::quiet_NaN();  // over finite values
  int64_t nan = 0, inf = 0;
};

TensorStats stats(const Tensor& t) {
  TensorStats s;
  double sum = 0.0;
  int64_t finite = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = t.get(i);
    if (std::isnan(v)) {
      ++s.nan;
    } else if (std::isinf(v)) {
      ++s.inf;
    } else {
      s.min = finite == 0 ? v : std::min(s.min, v);
      s.max = finite == 0 ? v : std::max(s.max, v);
      sum += v;
      ++finite;
    }
  }
  if (finite > 0) s.mean = sum / static_cast<double>(finite);
  return s;
}

nlohmann::ordered_json number_or_null(double v) { return std::isfinite(v) ? nlohmann::ordered_json(v) : nullptr; }

nlohmann::ordered_json tensors_json(const std::vector<std::pair<std::string, const Tensor*>>& tensors) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const auto& [name, t] : tensors) {
    const TensorStats s = stats(*t);
    out.push_back({{"name", name},
                   {"dtype", dtype_name(t->dtype())},
                   {"shape", t->shape()},
                   {"bytes", t->nbytes()},
                   {"min", number_or_null(s.min)},
                   {"max", number_or_null(s.max)},
                   {"mean", number_or_null(s.mean)},
                   {"nan", s.nan},
                   {"inf", s.inf}});
  }
  return out;
}

void print_tensors(const std::vector<std::pair<std::string, const Tensor*>>& tensors) {
  size_t name_width = 4, bytes = 0;
  for (const auto& [name, t] : tensors) {
    name_width = std::max(name_width, name.size());
    bytes += t->nbytes();
  }
  std::cout << fmt::format("tensors: {} ({} bytes)\n", tensors.size(), bytes);
  std::cout << fmt::format("  {:<{}}  {:<7}  {:<16}  {:>12}  {:>12}  {:>12}  {:>5}  {:>5}\n", "name", name_width, "dtype",
                           "shape", "min", "max", "mean", "nan", "inf");
  for (const auto& [name, t] : tensors) {
    const TensorStats s = stats(*t);
    std::cout << fmt::format("  {:<{}}  {:<7}  {:<16}  {:>12.5g}  {:>12.5g}  {:>12.5g}  {:>5}  {:>5}\n", name, name_width,
                             dtype_name(t->dtype()), shape_string(t->shape()), s.min, s.max, s.mean, s.nan, s.inf);
  }
}

std::vector<std::pair<std::string, const Tensor*>> tensor_list(const SafetensorsFile& f) {
  std::vector<std::pair<std::string, const Tensor*>> out;
  for (const auto& [name, t] : f.tensors) out.emplace_back(name, &t);
  return out;
}

std::vector<std::pair<std::string, const Tensor*>> tensor_list(const Case& c) {
  std::vector<std::pair<std::string, const Tensor*>> out;
  for (const auto& [name, t] : c.tensors) out.emplace_back(name, &t);
  return out;
}

int inspect_raw(const InspectOptions& o) {
  const SafetensorsFile f = read_safetensors(o.file);
  if (o.json) {
    nlohmann::ordered_json out = {{"file", o.file}, {"metadata", f.metadata}, {"tensors", tensors_json(tensor_list(f))}};
    std::cout << out.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
    return kExitOk;
  }
  std::cout << fmt::format("file: {}\nmetadata:\n", o.file);
  for (const auto& [key, value] : f.metadata) std::cout << fmt::format("  {}: {}\n", key, value);
  print_tensors(tensor_list(f));
  return kExitOk;
}

// A one-line summary of the config fields that shape a case.
std::string config_summary(const TransformerConfig& c) {
  std::string s = fmt::format("num_layers={} hidden_size={} num_attention_heads={} num_query_groups={} kv_channels={} "
                              "ffn_hidden_size={} normalization={} activation_func={} gated_linear_unit={}",
                              c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups.value_or(0),
                              c.kv_channels.value_or(0), c.ffn_hidden_size.value_or(0), c.normalization,
                              c.activation_func, c.gated_linear_unit);
  if (c.num_moe_experts) s += fmt::format(" num_moe_experts={} moe_router_topk={}", *c.num_moe_experts, c.moe_router_topk);
  return s;
}

int inspect(const InspectOptions& o) {
  if (o.raw) return inspect_raw(o);
  Case c;
  try {
    c = read_case(o.file);
  } catch (const CaseFormatError& e) {
    throw CaseFormatError(std::string(e.what()) + "\n(--raw inspects a safetensors file that is not a valid case)");
  }
  if (o.json) {
    nlohmann::ordered_json tolerance = nlohmann::ordered_json::object();
    for (const auto& [pattern, t] : c.tolerance) tolerance[pattern] = {{"rtol", t.rtol}, {"atol", t.atol}};
    nlohmann::ordered_json out = {
        {"file", o.file},
        {"component", c.component},
        {"producer", c.producer},
        {"description", c.description},
        {"layer_number", c.layer_number},
        {"attn_mask_type", c.attn_mask_type},
        {"training", c.training},
        {"seed", c.seed ? nlohmann::ordered_json(*c.seed) : nullptr},
        {"parallel", c.parallel ? nlohmann::ordered_json::parse(*c.parallel) : nullptr},
        {"tolerance", tolerance},
        {"other_metadata", c.other_metadata},
        {"config", nlohmann::ordered_json::parse(config_to_json_text(c.config))},
        {"tensors", tensors_json(tensor_list(c))}};
    std::cout << out.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
    return kExitOk;
  }
  std::cout << fmt::format("case: {}\n", o.file);
  std::cout << fmt::format("  component:      {}\n", c.component);
  if (!c.producer.empty()) std::cout << fmt::format("  producer:       {}\n", c.producer);
  if (!c.description.empty()) std::cout << fmt::format("  description:    {}\n", c.description);
  std::cout << fmt::format("  layer_number:   {}\n", c.layer_number);
  std::cout << fmt::format("  attn_mask_type: {}\n", c.attn_mask_type);
  std::cout << fmt::format("  training:       {}\n", c.training);
  if (c.seed) std::cout << fmt::format("  seed:           {}\n", *c.seed);
  if (c.parallel) std::cout << fmt::format("  parallel:       {}\n", *c.parallel);
  for (const auto& [pattern, t] : c.tolerance) {
    std::cout << fmt::format("  tolerance:      {}: rtol={:g} atol={:g}\n", pattern, t.rtol, t.atol);
  }
  for (const auto& [key, value] : c.other_metadata) std::cout << fmt::format("  {}: {}\n", key, value);
  if (o.full_config) {
    std::cout << "  config:\n" << config_to_json_text(c.config) << "\n";
  } else {
    std::cout << fmt::format("  config:         {} (--config for every field)\n", config_summary(c.config));
  }
  print_tensors(tensor_list(c));
  return kExitOk;
}

}  // namespace

void register_case(CLI::App& app, Action& action) {
  CLI::App* group = app.add_subcommand("case", "Work with case files (safetensors; shared/spec/case-format.md)");
  group->require_subcommand(1);
  auto options = std::make_shared<InspectOptions>();
  CLI::App* cmd = group->add_subcommand(
      "inspect", "Show a case file: metadata, config, and every tensor's dtype, shape, min/max/mean, NaN/Inf counts");
  cmd->add_option("file", options->file, "case file (.safetensors)")->required();
  cmd->add_flag("--json", options->json, "print JSON instead of text");
  cmd->add_flag("--raw", options->raw, "inspect any safetensors file without requiring a valid case");
  cmd->add_flag("--config", options->full_config, "print every config field (text output)");
  cmd->callback([&action, options] { action = [options] { return inspect(*options); }; });
  register_case_make(*group, action);
}

}  // namespace paritron::cli
