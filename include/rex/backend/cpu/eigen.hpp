// The one place rex includes Eigen: with Eigen's own OpenMP parallelism switched off.
//
// Eigen's parallel GEMM chooses its blocking (how the k sum is cut into panels) and its split of
// the rows by the number of threads, so a product would round differently at 1, 2 or 3 threads, and
// with it every result of training. rex therefore runs Eigen single-threaded and parallelises
// products itself over tiles whose shapes depend only on the product's (rex/backend/cpu/gemm.hpp).
// A program that includes Eigen before rex, with OpenMP on, must define EIGEN_DONT_PARALLELIZE
// itself (the rex::rex CMake target does); otherwise it fails to compile here.
#pragma once

#ifndef EIGEN_DONT_PARALLELIZE
#define EIGEN_DONT_PARALLELIZE
#endif
#include <Eigen/Core>

#ifdef EIGEN_HAS_OPENMP
#error \
    "Eigen was included before rex with its OpenMP GEMM on: define EIGEN_DONT_PARALLELIZE (rex's results would otherwise depend on the number of threads)"
#endif
