// Collecting a sharded run's results into whole tensors on world rank 0.
//
// Each rank describes what it holds as pieces: a slice of a global tensor
// along one axis (token rows of an [S, B, ...] output, the TP range of a
// weight gradient) or a partial sum (token counts, losses of its token
// group). Exactly one replica of each slice contributes (e.g. TP rank 0 for
// rows every TP rank holds without sequence parallelism; data-parallel rank
// 0 for gradients already all-reduced), and rank 0 checks that every element
// of every tensor was written exactly once.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/case_file.h"
#include "optimized/model/context.h"
#include "optimized/model/moe.h"

namespace paritron::opt {

// The message tag of the final gather: MPI guarantees tags up to 32767 only
// (the UCX transport packs them tightly), so pipeline tags stay below it.
inline constexpr int64_t kGatherTag = 32767;

struct Piece {
  std::string name;           // "outputs.output", "grads.weights.linear_fc1.weight", ...
  Shape global_shape;
  int64_t axis = 0;           // the axis `index` runs along (global tensor seen as [outer, n_axis, inner])
  std::vector<int64_t> index; // global indices along `axis` of the piece's slices (empty: the whole tensor)
  bool sum = false;           // added into the tensor (partial sums) instead of written
  std::vector<double> values; // [outer, index.size(), inner] row-major
};
using Pieces = std::vector<Piece>;

// Rows of an [S, B, w] tensor held as the hidden rows of a token layout
// ([hidden_rows, w]); contributed by TP rank 0 unless sequence parallel.
// sum: added into the tensor (a gradient several layers or pipeline stages
// contribute to, e.g. a block's context).
void add_rows_piece(Pieces& pieces, ModelContext& m, const std::string& name, const DTensor& rows,
                    const TokenLayout& tokens, int64_t tp_rank, bool sum = false);
// Rows of a per-head [S, B, H, hn] tensor held as [rows.size(), heads_loc * hn]:
// the token rows `rows` (global s * B + b) and the global heads head_offset ..
// head_offset + heads_loc. Gathered as the flattened [S * B * H, hn] (one
// index per (row, head)); gather_pieces gives it the case's shape.
void add_head_rows_piece(Pieces& pieces, ModelContext& m, const std::string& name, const DTensor& local,
                         const std::vector<int64_t>& rows, int64_t total_rows, int64_t heads_global,
                         int64_t head_offset, int64_t head_dim);
// The router outputs of a moe_layer case (reference/run_case.cpp router_outputs).
void add_moe_pieces(Pieces& pieces, ModelContext& m, const MoeSaved& moe, const TokenLayout& tokens);
// grads.weights.* of every parameter with a gradient, one replica each.
void add_param_grad_pieces(Pieces& pieces, ModelContext& m, const Case& c);

// Sends every rank's pieces to rank 0, which assembles `out` (F64 tensors);
// also the component outputs that are parameters themselves (an MLP's or
// attention's output_bias) and their gradients (inputs.grad_output_bias).
void gather_pieces(ModelContext& m, const Pieces& pieces, const Case& c, int64_t S, int64_t B,
                   std::map<std::string, Tensor>& out);

}  // namespace paritron::opt
