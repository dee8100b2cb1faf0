// Running the optimized implementation on a case file under a parallel
// layout: the entry point of the layout tests, `paritron optimized` and the
// parity harness. Eigen-free.
//
// Every rank loads its shard of the case's weights (TP slices of the global
// tensors, its pipeline stage's layers, its expert-parallel rank's experts)
// and of its inputs (its data-parallel batch slice, its context-parallel
// chunks, its sequence-parallel rows), runs forward and, when the case holds
// inputs.grad_output, backward of the case's loss (shared/spec/case-format.md)
// — pipeline stages with the 1F1B schedule over micro-batches — then reduces
// gradients as Megatron's DDP does (TP all-reduce of SP-partial gradients of
// replicated parameters, all-reduce over the data-parallel (x context) group,
// expert parameters over the data-modulo-expert group). World rank 0 gathers
// every output and gradient into whole tensors named as the reference names
// them, so a result compares with ref::run_reference directly.
//
// Batch-coupled results: a MoE router's capacity, aux loss and z-loss are
// computed over each rank's own tokens, as in Megatron. With data, context
// or sequence parallelism they then equal the reference run on each rank's
// token group, not on the whole batch (see reference_token_groups).
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/case_file.h"
#include "common/parallel_config.h"
#include "common/tensor.h"

namespace paritron::opt {

class Comm;

struct OptimizedOptions {
  DType dtype = DType::F32;       // params and activations: F32, BF16, F16 (F64: exact float64 math)
  std::string backend = "cpu";
  bool backward = true;           // when the case has inputs.grad_output
  // Pipeline micro-batches per data-parallel rank (each of b_local / M
  // sequences); 0 picks the largest M <= 2 * pp dividing b_local.
  int64_t micro_batches = 0;
  std::chrono::milliseconds timeout{std::chrono::seconds(120)};
};

struct OptimizedResult {
  std::map<std::string, Tensor> tensors;  // outputs.*, grads.* as F64 tensors of the global shapes (rank 0)
  std::vector<std::string> notes;
};

// The components the optimized side runs.
bool optimized_supports(const std::string& component);

// The pipeline micro-batches each data-parallel rank runs (options.micro_batches,
// or the default rule). Each is a token group of its own for a MoE router.
int64_t optimized_micro_batches(const Case& c, const ParallelConfig& pc, const OptimizedOptions& options);

// Everything a case and a layout must satisfy to run; empty when it runs.
std::vector<std::string> optimized_layout_issues(const Case& c, const ParallelConfig& pc);

// Throws Error listing every issue when optimized_layout_issues finds any.
void throw_if_unrunnable(const Case& c, const ParallelConfig& pc);

// Runs the case on pc's world of in-process ranks (a thread per rank).
OptimizedResult run_optimized(const Case& c, const ParallelConfig& pc, const OptimizedOptions& options = {});

// One rank's part, over any Comm whose world matches pc (MPI: every process
// calls it). Rank 0's result holds the gathered tensors; the others' are empty.
OptimizedResult run_optimized_rank(const Case& c, const ParallelConfig& pc, const OptimizedOptions& options,
                                   Comm& comm);

// A case on one rank with its weights loaded once, for benchmarks: forward
// and forward+backward of the case's inputs without the loading and gathering
// that run_optimized does around them.
class SingleRankModel {
 public:
  SingleRankModel(const Case& c, const OptimizedOptions& options = {});
  ~SingleRankModel();
  SingleRankModel(const SingleRankModel&) = delete;
  SingleRankModel& operator=(const SingleRankModel&) = delete;
  void forward();
  void forward_backward();  // needs inputs.grad_output; weight gradients accumulate

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace paritron::opt
