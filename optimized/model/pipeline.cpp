#include "optimized/model/pipeline.h"

#include <algorithm>

#include <fmt/format.h>

#include "common/error.h"
#include "optimized/model/gather.h"

namespace paritron::opt {
namespace {

class Schedule {
 public:
  Schedule(ModelContext& m, const std::vector<StagePlan>& chunks, const std::vector<TokenLayout>& layouts,
           const LayerArgs& args, PipelineIo& io)
      : m_(m), chunks_(chunks), layouts_(layouts), args_(args), io_(io),
        P_(m.ps.pp.size()), p_(m.ps.coord.pp), V_(static_cast<int64_t>(chunks.size())),
        M_(static_cast<int64_t>(layouts.size())),
        saved_(chunks.size(), std::vector<StageSaved>(layouts.size())) {}

  void forward(int64_t v, int64_t mb) {
    const TokenLayout& t = layouts_[static_cast<size_t>(mb)];
    DTensor x;
    if (p_ == 0 && v == 0) {
      x = io_.input(mb);
    } else {
      x = m_.empty({t.hidden_rows(), m_.cfg.hidden_size});
      m_.comm.recv(x, peer(p_ == 0 ? P_ - 1 : p_ - 1), tag(0, p_ == 0 ? v - 1 : v, mb));
    }
    const DTensor y = block_stage_forward(m_, chunks_[static_cast<size_t>(v)], x, t, args_, saved(v, mb));
    if (p_ == P_ - 1 && v == V_ - 1) {
      io_.output(mb, y);
    } else {
      m_.comm.send(y, peer(p_ == P_ - 1 ? 0 : p_ + 1), tag(0, v, mb));
    }
  }

  void backward(int64_t v, int64_t mb) {
    const TokenLayout& t = layouts_[static_cast<size_t>(mb)];
    DTensor dy;
    if (p_ == P_ - 1 && v == V_ - 1) {
      dy = io_.grad_output(mb);
    } else {
      dy = m_.empty({t.hidden_rows(), m_.cfg.hidden_size});
      m_.comm.recv(dy, peer(p_ == P_ - 1 ? 0 : p_ + 1), tag(1, p_ == P_ - 1 ? v + 1 : v, mb));
    }
    const DTensor dx = block_stage_backward(m_, chunks_[static_cast<size_t>(v)], dy, t, saved(v, mb));
    if (p_ == 0 && v == 0) {
      io_.input_grad(mb, dx);
    } else {
      m_.comm.send(dx, peer(p_ == 0 ? P_ - 1 : p_ - 1), tag(1, v, mb));
    }
  }

  int64_t P() const { return P_; }
  int64_t p() const { return p_; }
  int64_t V() const { return V_; }
  int64_t M() const { return M_; }

 private:
  // The global rank of pipeline stage `stage` in this rank's pipeline group.
  int64_t peer(int64_t stage) const { return m_.ps.pp.ranks[static_cast<size_t>(stage)]; }
  // Messages are named by (direction, the sender's chunk, micro-batch).
  int64_t tag(int64_t direction, int64_t v, int64_t mb) const { return (direction * V_ + v) * M_ + mb; }
  StageSaved& saved(int64_t v, int64_t mb) { return saved_[static_cast<size_t>(v)][static_cast<size_t>(mb)]; }

  ModelContext& m_;
  const std::vector<StagePlan>& chunks_;
  const std::vector<TokenLayout>& layouts_;
  const LayerArgs& args_;
  PipelineIo& io_;
  int64_t P_, p_, V_, M_;
  std::vector<std::vector<StageSaved>> saved_;
};

}  // namespace

void run_pipeline(ModelContext& m, const std::vector<StagePlan>& chunks, const std::vector<TokenLayout>& layouts,
                  const LayerArgs& args, PipelineIo& io, bool backward) {
  if (2 * static_cast<int64_t>(chunks.size() * layouts.size()) >= kGatherTag) {
    throw Error(fmt::format("{} model chunks x {} micro-batches need more pipeline message tags than MPI "
                            "guarantees (32767)",
                            chunks.size(), layouts.size()));
  }
  Schedule s(m, chunks, layouts, args, io);
  if (s.V() > 1 || !backward) {
    for (int64_t v = 0; v < s.V(); ++v) {
      for (int64_t mb = 0; mb < s.M(); ++mb) s.forward(v, mb);
    }
    if (!backward) return;
    for (int64_t v = s.V(); v-- > 0;) {
      for (int64_t mb = 0; mb < s.M(); ++mb) s.backward(v, mb);
    }
    return;
  }
  // 1F1B.
  const int64_t warmup = std::min(s.P() - s.p() - 1, s.M());
  for (int64_t mb = 0; mb < warmup; ++mb) s.forward(0, mb);
  for (int64_t mb = warmup; mb < s.M(); ++mb) {
    s.forward(0, mb);
    s.backward(0, mb - warmup);
  }
  for (int64_t mb = s.M() - warmup; mb < s.M(); ++mb) s.backward(0, mb);
}

}  // namespace paritron::opt
