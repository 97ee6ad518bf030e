// The training library in one include: run config, corpus, model folders and checkpoints, the
// training step, evaluation and the routing report, sampling, the metrics log, Ctrl-C handling and
// the checks the ranks of a data-parallel run agree on.
#pragma once

#include "rex/train/checkpoint.hpp"
#include "rex/train/config.hpp"
#include "rex/train/corpus.hpp"
#include "rex/train/evaluate.hpp"
#include "rex/train/interrupt.hpp"
#include "rex/train/metrics.hpp"
#include "rex/train/program.hpp"
#include "rex/train/ranks.hpp"
#include "rex/train/sample.hpp"
#include "rex/train/step.hpp"
