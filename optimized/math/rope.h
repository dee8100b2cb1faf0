// Rotary position embedding over one token row, single source (PARITRON_HD).
// Semantics: reference/rotary_pos_emb.h. cos/sin: the float32 cos/sin of the
// float32 angle (torch.cos on the fp32 freqs), correctly rounded through
// double, then rounded to the activation dtype by the caller (cos_.to(t.dtype)).
// Pairs (i, j) of each head's first rot_dim channels, i the channel that
// rotate_half negates:
//   non-interleaved  (c, c + rot_dim/2);  interleaved (2k, 2k + 1)
//   forward   y_i = x_i cos_i - x_j sin_i,   y_j = x_j cos_j + x_i sin_j
//   backward  d_i = g_i cos_i + g_j sin_j,   d_j = g_j cos_j - g_i sin_i   (the transpose)
// Channels >= rot_dim pass through. In and out may alias (each pair is read
// before it is written).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math/host_device.h"

namespace paritron::math {

PARITRON_HD inline float rope_cos(float angle) { return static_cast<float>(cos(static_cast<double>(angle))); }
PARITRON_HD inline float rope_sin(float angle) { return static_cast<float>(sin(static_cast<double>(angle))); }

// One head (hn channels at x / y); cs, sn: rot_dim cos / sin for this token.
template <class T>
PARITRON_HD inline void rope_head(const T* x, T* y, const T* cs, const T* sn, int64_t hn, int64_t rot_dim,
                                  bool interleaved, bool backward) {
  const int64_t half = rot_dim / 2;
  const int64_t step = interleaved ? 2 : 1;      // i advances by
  const int64_t partner = interleaved ? 1 : half;  // j = i + partner
  for (int64_t k = 0; k < half; ++k) {
    const int64_t i = k * step;
    const int64_t j = i + partner;
    const T xi = x[i], xj = x[j];
    if (!backward) {
      y[i] = xi * cs[i] - xj * sn[i];
      y[j] = xj * cs[j] + xi * sn[j];
    } else {
      y[i] = xi * cs[i] + xj * sn[j];
      y[j] = xj * cs[j] - xi * sn[i];
    }
  }
  if (x != y) {
    for (int64_t c = rot_dim; c < hn; ++c) y[c] = x[c];
  }
}

}  // namespace paritron::math
