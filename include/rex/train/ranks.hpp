// What the ranks of a data-parallel run (rex/dist/) must agree on before the first step: the code
// they run, the config, the training text and the step they start from. Each rank compares its
// own with rank 0's; when any differs, every rank stops before any work is done, with one message
// naming each difference.
// Also the split the run needs: train.batch_size a multiple of ranks x train.grad_accum, and at
// least one validation batch per rank; and the state every rank starts from: rank 0's.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "rex/core/error.hpp"
#include "rex/dist/communicator.hpp"
#include "rex/train/checkpoint.hpp"
#include "rex/train/config.hpp"

namespace rex::train {

// The build every rank must share: the program's REX_CODE_VERSION (examples/CMakeLists.txt sets
// the git commit), or "unversioned".
inline std::string code_version() {
#if defined(REX_CODE_VERSION)
  return REX_CODE_VERSION;
#else
  return "unversioned";
#endif
}

// Throws dist::CollectiveError on every rank, naming each difference, when any rank differs
// from rank 0.
inline void check_ranks_agree(dist::Communicator& comm, const RunConfig& config,
                              const CheckpointInfo& corpus, int64_t start_step) {
  const TrainConfig& t = config.train;
  const int64_t ranks = comm.size();
  REX_CHECK(t.batch_size % (ranks * t.grad_accum) == 0, "train.batch_size (", t.batch_size,
            ") must be a multiple of the number of ranks (", ranks, ") x train.grad_accum (",
            t.grad_accum, "): each rank trains on an equal share of every batch");
  REX_CHECK(t.eval_batches >= ranks, "train.eval_batches (", t.eval_batches,
            ") must be at least the number of ranks (", ranks, ")");
  if (ranks == 1) return;
  const nlohmann::json mine = {{"code", code_version()},
                               {"corpus_bytes", corpus.corpus_bytes},
                               {"corpus_hash", corpus.corpus_hash},
                               {"config", to_json(config)},
                               {"start_step", start_step}};
  const nlohmann::json root = nlohmann::json::parse(comm.broadcast(mine.dump()));
  std::string difference;
  auto here_and_root = [&](const char* key) {
    return " (" + mine.at(key).dump() + " here, " + root.at(key).dump() + " on rank 0)";
  };
  if (mine.at("code") != root.at("code")) {
    difference =
        "the program's code version" + here_and_root("code") + ": run the same build on every rank";
  } else if (mine.at("corpus_bytes") != root.at("corpus_bytes") ||
             mine.at("corpus_hash") != root.at("corpus_hash")) {
    difference = "the --data text: " + mine.at("corpus_bytes").dump() + " bytes (hash " +
                 mine.at("corpus_hash").dump() + ") here, " + root.at("corpus_bytes").dump() +
                 " bytes (hash " + root.at("corpus_hash").dump() + ") on rank 0";
  } else if (mine.at("config") != root.at("config")) {
    difference = "the config: " +
                 rex::detail::first_config_difference(mine.at("config"), root.at("config")) +
                 ", here vs rank 0";
  } else if (mine.at("start_step") != root.at("start_step")) {
    difference = "the step it starts from" + here_and_root("start_step");
  }
  std::string report;
  const std::vector<std::string> differences = comm.all_gather(difference);
  for (size_t r = 0; r < differences.size(); ++r)
    if (!differences[r].empty())
      report += "\n  rank " + std::to_string(r) + " differs from rank 0 in " + differences[r];
  if (!report.empty())
    throw dist::CollectiveError("the " + std::to_string(ranks) +
                                " ranks of this run do not agree; no step was run:" + report);
}

// Every rank takes rank 0's parameters and optimizer state. They are equal already when every rank
// built the model from the same seed or read the same checkpoint; this makes it so even when the
// ranks' copies of a checkpoint differ (the agreement check compares config and step, not weights).
inline void start_from_rank0(dist::Communicator& comm, TrainingState& run) {
  if (comm.size() == 1) return;
  NoGradGuard no_grad;
  for (const optim::Parameter& p : run.optimizer.parameters()) {
    Tensor values = p.tensor;
    comm.broadcast(values);
  }
  std::map<std::string, Tensor> state = run.optimizer.state();  // host copies
  for (auto& [name, value] : state) comm.broadcast(value);
  run.optimizer.load_state(state);
}

}  // namespace rex::train
