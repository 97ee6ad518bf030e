// rex: header-only tensors and reverse-mode autodiff for ReX-MoE research. Include this one header.
#pragma once

#include "rex/autograd/engine.hpp"
#include "rex/autograd/graph.hpp"
#include "rex/core/dtype.hpp"
#include "rex/core/error.hpp"
#include "rex/core/factory.hpp"
#include "rex/core/random.hpp"
#include "rex/core/shape.hpp"
#include "rex/core/tensor.hpp"
#include "rex/ops/broadcast.hpp"
#include "rex/ops/elementwise.hpp"
#include "rex/ops/matmul.hpp"
#include "rex/ops/reduce.hpp"
#include "rex/ops/shape.hpp"
