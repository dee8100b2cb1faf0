#include "optimized/model/gather.h"

#include <fmt/format.h>

#include "common/error.h"

namespace paritron::opt {
namespace {

std::vector<double> host_values(ModelContext& m, const DTensor& t) {
  return m.be.download(t).to_doubles();
}

// Pieces travel as one F64 message per rank:
//   [count, then per piece: name length, name bytes..., ndim, dims..., axis, sum,
//    index count, indices..., value count, values...]
// (every integer is far below 2^53, so doubles carry them exactly).
std::vector<double> serialise(const Pieces& pieces) {
  std::vector<double> out{static_cast<double>(pieces.size())};
  auto put = [&](int64_t v) { out.push_back(static_cast<double>(v)); };
  for (const Piece& p : pieces) {
    put(static_cast<int64_t>(p.name.size()));
    for (char ch : p.name) put(static_cast<unsigned char>(ch));
    put(static_cast<int64_t>(p.global_shape.size()));
    for (int64_t d : p.global_shape) put(d);
    put(p.axis);
    put(p.sum ? 1 : 0);
    put(static_cast<int64_t>(p.index.size()));
    for (int64_t i : p.index) put(i);
    put(static_cast<int64_t>(p.values.size()));
    out.insert(out.end(), p.values.begin(), p.values.end());
  }
  return out;
}

Pieces deserialise(const std::vector<double>& in) {
  size_t at = 0;
  auto get = [&]() { return static_cast<int64_t>(in.at(at++)); };
  Pieces pieces(static_cast<size_t>(get()));
  for (Piece& p : pieces) {
    p.name.resize(static_cast<size_t>(get()));
    for (char& ch : p.name) ch = static_cast<char>(get());
    p.global_shape.resize(static_cast<size_t>(get()));
    for (int64_t& d : p.global_shape) d = get();
    p.axis = get();
    p.sum = get() != 0;
    p.index.resize(static_cast<size_t>(get()));
    for (int64_t& i : p.index) i = get();
    const size_t n = static_cast<size_t>(get());
    p.values.assign(in.begin() + static_cast<std::ptrdiff_t>(at), in.begin() + static_cast<std::ptrdiff_t>(at + n));
    at += n;
  }
  return pieces;
}

// Writes pieces into whole tensors, counting how often each element is written.
class Assembler {
 public:
  void add(const Piece& p) {
    Entry& e = entries_[p.name];
    if (e.tensor.numel() == 1 && e.writes.empty()) {
      e.tensor = Tensor(DType::F64, p.global_shape);
      e.writes.assign(static_cast<size_t>(e.tensor.numel()), 0);
    }
    if (e.tensor.shape() != p.global_shape) {
      throw Error(fmt::format("{}: pieces disagree on the global shape ({} vs {})", p.name,
                              shape_string(e.tensor.shape()), shape_string(p.global_shape)));
    }
    int64_t outer = 1, inner = 1;
    const int64_t n_axis = p.global_shape.empty() ? 1 : p.global_shape[static_cast<size_t>(p.axis)];
    for (int64_t d = 0; d < static_cast<int64_t>(p.global_shape.size()); ++d) {
      if (d < p.axis) outer *= p.global_shape[static_cast<size_t>(d)];
      if (d > p.axis) inner *= p.global_shape[static_cast<size_t>(d)];
    }
    std::vector<int64_t> index = p.index;
    if (index.empty()) {
      for (int64_t i = 0; i < n_axis; ++i) index.push_back(i);
    }
    const int64_t n = static_cast<int64_t>(index.size());
    if (static_cast<int64_t>(p.values.size()) != outer * n * inner) {
      throw Error(fmt::format("{}: a piece has {} values for {} slices", p.name, p.values.size(), n));
    }
    auto data = e.tensor.data<double>();
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < inner; ++j) {
          const size_t dst = static_cast<size_t>((o * n_axis + index[static_cast<size_t>(i)]) * inner + j);
          const double v = p.values[static_cast<size_t>((o * n + i) * inner + j)];
          data[dst] = p.sum ? data[dst] + v : v;
          e.writes[dst] += 1;
          e.summed = e.summed || p.sum;
        }
      }
    }
  }

  // Every written tensor, each element written as often as its pieces say.
  void finish(std::map<std::string, Tensor>& out) {
    for (auto& [name, e] : entries_) {
      // A slice is written exactly once; a partial sum at least once.
      for (size_t i = 0; i < e.writes.size(); ++i) {
        if (e.summed ? e.writes[i] < 1 : e.writes[i] != 1) {
          throw Error(fmt::format("internal error gathering {}: element {} was written {} times", name, i,
                                  e.writes[i]));
        }
      }
      out[name] = std::move(e.tensor);
    }
  }

 private:
  struct Entry {
    Tensor tensor;
    std::vector<int> writes;
    bool summed = false;
  };
  std::map<std::string, Entry> entries_;
};

Tensor tensor_of(const std::vector<double>& v, Shape shape) { return Tensor::from_values(DType::F64, std::move(shape), v); }

}  // namespace

void add_rows_piece(Pieces& pieces, ModelContext& m, const std::string& name, const DTensor& rows,
                    const TokenLayout& tokens, int64_t tp_rank, bool sum) {
  if (!m.sequence_parallel() && tp_rank != 0) return;
  Piece p;
  p.name = name;
  p.global_shape = {tokens.s_global * tokens.b_global, rows.cols()};
  p.axis = 0;
  p.index = tokens.hidden_token_rows();
  p.sum = sum;
  p.values = host_values(m, rows);
  pieces.push_back(std::move(p));
}

void add_head_rows_piece(Pieces& pieces, ModelContext& m, const std::string& name, const DTensor& local,
                         const std::vector<int64_t>& rows, int64_t total_rows, int64_t heads_global,
                         int64_t head_offset, int64_t head_dim) {
  const int64_t heads_loc = local.cols() / head_dim;
  if (local.rows() != static_cast<int64_t>(rows.size()) || local.cols() != heads_loc * head_dim ||
      head_offset + heads_loc > heads_global) {
    throw Error(fmt::format("{}: a [{}, {}] piece for {} rows of heads {}..{} (head dim {}, {} heads)", name,
                            local.rows(), local.cols(), rows.size(), head_offset, head_offset + heads_loc, head_dim,
                            heads_global));
  }
  Piece p;
  p.name = name;
  p.global_shape = {total_rows * heads_global, head_dim};
  p.axis = 0;
  p.index.reserve(rows.size() * static_cast<size_t>(heads_loc));
  for (int64_t r : rows) {
    for (int64_t j = 0; j < heads_loc; ++j) p.index.push_back(r * heads_global + head_offset + j);
  }
  p.values = host_values(m, local);
  pieces.push_back(std::move(p));
}

void add_moe_pieces(Pieces& pieces, ModelContext& m, const MoeSaved& moe, const TokenLayout& tokens) {
  if (!m.sequence_parallel() && m.ps.coord.tp != 0) return;
  const std::vector<int64_t> rows = tokens.hidden_token_rows();
  const int64_t T = tokens.s_global * tokens.b_global;
  auto rows_piece = [&](const std::string& name, const Tensor& t) {
    if (t.dim() != 2) return;
    Piece p;
    p.name = name;
    p.global_shape = {T, t.shape()[1]};
    p.index = rows;
    p.values = t.to_doubles();
    pieces.push_back(std::move(p));
  };
  rows_piece("outputs.router_logits", moe.router_logits);
  if (moe.router_probs) rows_piece("outputs.router_probs", *moe.router_probs);
  rows_piece("outputs.router_scores", moe.router_scores);
  rows_piece("outputs.router_indices", moe.router_indices);
  if (moe.output_bias.defined()) add_rows_piece(pieces, m, "outputs.output_bias", moe.output_bias, tokens, m.ps.coord.tp);
  auto sum_piece = [&](const std::string& name, Shape shape, std::vector<double> values) {
    Piece p;
    p.name = name;
    p.global_shape = std::move(shape);
    p.sum = true;
    p.values = std::move(values);
    pieces.push_back(std::move(p));
  };
  std::vector<double> counts(moe.tokens_per_expert.begin(), moe.tokens_per_expert.end());
  sum_piece("outputs.tokens_per_expert", {static_cast<int64_t>(counts.size())}, counts);
  if (moe.aux_loss) sum_piece("outputs.aux_loss", {}, {*moe.aux_loss});
  if (moe.z_loss) sum_piece("outputs.z_loss", {}, {*moe.z_loss});
}

void add_param_grad_pieces(Pieces& pieces, ModelContext& m, const Case&) {
  for (auto& [key, param] : m.params) {
    if (!param.used) continue;
    const Group& replicas = param.expert ? m.ps.edp : m.ps.dp_cp;
    if (replicas.index != 0) continue;
    if (param.shard.axis == -1 && m.ps.coord.tp != 0) continue;
    Piece p;
    p.name = "grads." + param.name;
    p.global_shape = param.global_shape;
    const std::vector<double> values = host_values(m, param.grad);
    if (param.shard.axis == -1) {
      p.values = values;
      pieces.push_back(std::move(p));
      continue;
    }
    p.axis = param.shard.axis;
    for (const IndexRange& r : param.shard.ranges) {
      for (int64_t i = r.begin; i < r.end; ++i) p.index.push_back(i);
    }
    p.values = values;
    pieces.push_back(std::move(p));
  }
}

void gather_pieces(ModelContext& m, const Pieces& pieces, const Case& c, int64_t S, int64_t B,
                   std::map<std::string, Tensor>& out) {
  const std::vector<double> mine = serialise(pieces);
  const int64_t n = static_cast<int64_t>(mine.size());
  const std::vector<int64_t> sizes = m.comm.all_gather_ints(std::span<const int64_t>(&n, 1), m.ps.world);
  if (m.ps.rank != 0) {
    DTensor msg = m.be.upload(tensor_of(mine, {n}), DType::F64);
    m.comm.send(msg, 0, kGatherTag);
    return;
  }
  Assembler assembler;
  for (const Piece& p : pieces) assembler.add(p);
  for (int64_t r = 1; r < m.ps.world.size(); ++r) {
    DTensor msg = m.be.empty(DType::F64, {sizes[static_cast<size_t>(r)]});
    m.comm.recv(msg, r, kGatherTag);
    for (const Piece& p : deserialise(m.be.download(msg).to_doubles())) assembler.add(p);
  }
  assembler.finish(out);

  // MLP / attention cases: output_bias is linear_fc2 / linear_proj's bias
  // itself (skip_bias_add), and its gradient is inputs.grad_output_bias.
  const std::string bias = c.component == "mlp"                                                    ? "linear_fc2.bias"
                           : c.component == "self_attention" || c.component == "cross_attention" ? "linear_proj.bias"
                                                                                                  : "";
  if (!bias.empty() && c.tensors.count("weights." + bias)) {
    out["outputs.output_bias"] = m.be.download(m.param(bias).value).to(DType::F64);
    if (out.count("grads.inputs.hidden_states")) {
      auto g = c.tensors.find("inputs.grad_output_bias");
      out["grads.weights." + bias] =
          g != c.tensors.end() ? g->second.to(DType::F64) : Tensor(DType::F64, {c.config.hidden_size});
    }
  }
  // Inputs' gradients (gathered as rows, or per-head rows) take the input's
  // shape; so do the per-head outputs of the dot_product_attention
  // ([S, B, np * hn]) and rotary_pos_emb (t's shape) cases.
  for (auto& [name, t] : out) {
    if (name.rfind("grads.inputs.", 0) != 0) continue;
    auto in = c.tensors.find(name.substr(6));
    if (in != c.tensors.end() && in->second.numel() == t.numel() && in->second.shape() != t.shape()) {
      t = Tensor::from_bytes(DType::F64, in->second.shape(), t.bytes());
    }
  }
  if (auto it = out.find("outputs.output"); it != out.end()) {
    if (c.component == "rotary_pos_emb" && c.tensors.count("inputs.t")) {
      it->second = Tensor::from_bytes(DType::F64, c.tensors.at("inputs.t").shape(), it->second.bytes());
    } else if (c.component == "dot_product_attention") {
      it->second = Tensor::from_bytes(DType::F64, {S, B, it->second.numel() / (S * B)}, it->second.bytes());
    }
  }
  // Rows pieces are gathered as [S*B, w]; outputs of [S, B, ...] cases take the case's shape.
  for (const char* name : {"outputs.output", "grads.inputs.hidden_states", "outputs.output_bias"}) {
    auto it = out.find(name);
    if (it == out.end() || it->second.dim() != 2 || it->second.shape()[0] != S * B) continue;
    it->second = Tensor::from_bytes(DType::F64, {S, B, it->second.shape()[1]}, it->second.bytes());
  }
  if (auto it = out.find("outputs.router_indices"); it != out.end()) it->second = it->second.to(DType::I64);
  if (auto it = out.find("outputs.tokens_per_expert"); it != out.end()) it->second = it->second.to(DType::I64);
}

}  // namespace paritron::opt
