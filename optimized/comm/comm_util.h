// Helpers shared by the comm backends (internal to optimized/comm/).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "common/math/float_format.h"
#include "optimized/comm/comm.h"

namespace paritron::opt::comm_detail {

// One member's call of a collective, as the consistency check sees it.
struct CallDesc {
  std::string_view op;  // "all_reduce", ... (static strings)
  std::string group_name;
  bool has_in = false, has_out = false;
  DType dtype = DType::F32, storage = DType::F32;          // of in (or the in-place tensor)
  DType out_dtype = DType::F32, out_storage = DType::F32;  // of out
  Shape in_shape, out_shape;
  std::vector<int64_t> send_rows, recv_rows;  // all_to_all_v
  int64_t num_ints = 0;                       // all_gather_ints
  int64_t root = 0;                           // broadcast
  std::string describe() const;               // "all_gather(F32[2, 3] -> F32[4, 3])"
};

// The descriptor of a collective on tensor `in` (and `out`, when it has one).
CallDesc tensor_call(std::string_view op, const DTensor& in, const DTensor* out);

// "" when the members' calls (in group order) agree: same op, group name,
// dtypes and compatible sizes; else a message naming the op, the group, the
// problem and each rank's call. all_reduce and reduce_scatter must sum a
// storage can_sum accepts: by default the host's summable storages (f32, f64,
// i64, i32); a device comm also sums bf16 / f16 storage.
std::string check_calls(const std::vector<const CallDesc*>& calls, const Group& g,
                        const std::function<bool(DType)>& can_sum = {});

// Throws CommError unless `rank` is member g.index of g and every member is a
// distinct rank of the world.
void check_group(const Group& g, int64_t rank, int64_t world_size, std::string_view op);

// Elements of one dim-0 row (1 for a 0-d tensor).
int64_t row_width(const DTensor& t);

// The format sums of t are rounded to: t's dtype when it is narrower than the
// storage (bf16/fp16 values in f32 storage), else nullptr (no rounding).
const math::FloatFormat* rounding_format(const DTensor& t);
void round_in_place(void* data, DType storage, int64_t n, const math::FloatFormat* fmt);

bool summable(DType storage);
// out[i] = inputs[0][begin + i] + inputs[1][begin + i] + ... (that order, in
// the storage type: fp32 for F32, double for F64), rounded with fmt.
// out may alias inputs[k] + begin.
void sum_members(const std::vector<const void*>& inputs, DType storage, int64_t begin, int64_t count, void* out,
                 const math::FloatFormat* fmt);

}  // namespace paritron::opt::comm_detail
