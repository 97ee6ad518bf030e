// rex::dist: the processes of a data-parallel run and the collectives they need. rex does not
// write a transport: between processes and machines it calls MPI, between GPUs NCCL
// (docs/distributed.md).
//
// Communicator::world() is the set of processes an MPI launcher (mpirun, srun) started, with this
// process's rank. It initialises MPI on first use when the program was built with MPI (the
// rex::dist CMake target defines REX_WITH_MPI) and was started by a launcher; otherwise the world
// is this one process and every collective leaves its input as it is, so a single-process program
// needs no change and the header-only library needs no MPI.
//
// Collectives must be called by every rank, in the same order, with the same sizes (MPI's rule).
// Host memory is reduced over MPI. CUDA memory is reduced with NCCL (REX_WITH_NCCL, one rank per
// GPU), on rex's CUDA stream so that the reduction is ordered after the kernels that produced the
// gradients; NCCL's id is made on rank 0 and broadcast over MPI.
//
// fail() ends every rank at once (MPI_Abort) after an error on any of them: a rank that returned
// normally would leave the others waiting in a collective until a timeout, or for ever.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "rex/backend/cuda/dispatch.hpp"
#include "rex/core/error.hpp"
#include "rex/core/tensor.hpp"

#if defined(REX_WITH_MPI)
#include <mpi.h>
#endif
#if defined(REX_WITH_NCCL)
#include <cuda_runtime.h>
#include <nccl.h>

#include "rex/backend/cuda/runtime.hpp"
#endif

#if defined(REX_WITH_MPI)
namespace rex::detail {
inline void check_mpi(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw Error(std::string("MPI: ") + call + " failed: " + std::string(text, length));
}
}  // namespace rex::detail
#define REX_MPI(call) ::rex::detail::check_mpi((call), #call)
#endif

#if defined(REX_WITH_NCCL)
namespace rex::detail {
inline void check_nccl(ncclResult_t code, const char* call) {
  if (code != ncclSuccess)
    throw Error(std::string("NCCL: ") + call + " failed: " + ncclGetErrorString(code));
}
}  // namespace rex::detail
#define REX_NCCL(call) ::rex::detail::check_nccl((call), #call)
#endif

namespace rex::dist {

// Whether this process was started by an MPI launcher: OpenMPI's mpirun (OMPI_*), a PMI or PMIx
// launcher (MPICH's Hydra, SLURM's srun).
inline bool launched_by_mpi() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(name) != nullptr) return true;
  return false;
}

// An error every rank raises together, with the same message (the ranks disagree about the
// run): rank 0 reports it and every rank ends normally, with no rank left waiting.
struct CollectiveError : Error {
  using Error::Error;
};

// A collective started by Communicator::start_all_reduce_sum or start_all_gather; wait() before
// touching its buffers.
class Request {
 public:
  Request() = default;
#if defined(REX_WITH_MPI)
  explicit Request(MPI_Request r) : request_(r) {}
  // Lets MPI progress the reduction (MPI advances non-blocking collectives only inside its calls);
  // true once it has finished.
  bool test() {
    if (request_ == MPI_REQUEST_NULL) return true;
    int done = 0;
    REX_MPI(MPI_Test(&request_, &done, MPI_STATUS_IGNORE));
    return done != 0;
  }
  void wait() {
    if (request_ != MPI_REQUEST_NULL) REX_MPI(MPI_Wait(&request_, MPI_STATUS_IGNORE));
  }

 private:
  MPI_Request request_ = MPI_REQUEST_NULL;
#else
  bool test() { return true; }
  void wait() {}
#endif
};

class Communicator {
 public:
  // The processes of this run (one, without MPI or a launcher). MPI is finalised at exit.
  static Communicator& world() {
    static Communicator world;
    return world;
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root() const { return rank_ == 0; }

  // Sums over the ranks, in place, on every rank. Host memory.
  void all_reduce_sum(double* data, size_t n) { reduce(data, n, kDouble); }
  void all_reduce_sum(int64_t* data, size_t n) { reduce(data, n, kInt64); }
  void all_reduce_sum(std::vector<int64_t>& v) { all_reduce_sum(v.data(), v.size()); }
  void all_reduce_sum(std::vector<double>& v) { all_reduce_sum(v.data(), v.size()); }
  // Whether `flag` is true on any rank.
  bool any(bool flag) {
    int64_t count = flag ? 1 : 0;
    all_reduce_sum(&count, 1);
    return count > 0;
  }

  // Starts summing n floats of host memory in place on every rank; the buffer must stay untouched
  // until the request's wait() has returned.
  Request start_all_reduce_sum(float* data, size_t n) {
#if defined(REX_WITH_MPI)
    if (size_ > 1) {
      MPI_Request request = MPI_REQUEST_NULL;
      REX_MPI(MPI_Iallreduce(MPI_IN_PLACE, data, checked_count(n), MPI_FLOAT, MPI_SUM,
                             MPI_COMM_WORLD, &request));
      return Request(request);
    }
#endif
    (void)data, (void)n;
    return {};
  }

  // Starts gathering every rank's n floats of host memory into recv (ranks x n, in rank order) on
  // every rank; neither buffer may be touched until the request's wait() has returned.
  Request start_all_gather(const float* send, size_t n, float* recv) {
#if defined(REX_WITH_MPI)
    if (size_ > 1) {
      MPI_Request request = MPI_REQUEST_NULL;
      REX_MPI(MPI_Iallgather(send, checked_count(n), MPI_FLOAT, recv, checked_count(n), MPI_FLOAT,
                             MPI_COMM_WORLD, &request));
      return Request(request);
    }
#endif
    std::copy(send, send + n, recv);
    return {};
  }

  // Sums n floats of CUDA memory in place on every rank (NCCL), queued on rex's CUDA stream.
  // Between ncclGroupStart/End (group()), several of these become one launch.
  void all_reduce_sum_device(float* data, size_t n) {
    if (size_ == 1) return;
#if defined(REX_WITH_NCCL)
    REX_NCCL(ncclAllReduce(data, data, n, ncclFloat, ncclSum, nccl(),
                           static_cast<cudaStream_t>(rex::cuda::stream_handle())));
#else
    (void)data, (void)n;
    throw_built_without_nccl();
#endif
  }
  // Runs f, whose device reductions NCCL then launches together.
  template <class F>
  void group(F&& f) {
#if defined(REX_WITH_NCCL)
    if (size_ > 1) REX_NCCL(ncclGroupStart());
    f();
    if (size_ > 1) REX_NCCL(ncclGroupEnd());
#else
    f();
#endif
  }

  // Every rank's text, in rank order, on every rank.
  std::vector<std::string> all_gather(const std::string& text) {
    if (size_ == 1) return {text};
    std::vector<std::string> out(static_cast<size_t>(size_));
#if defined(REX_WITH_MPI)
    int length = checked_count(text.size());
    std::vector<int> lengths(out.size()), starts(out.size());
    REX_MPI(MPI_Allgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, MPI_COMM_WORLD));
    int total = 0;
    for (size_t r = 0; r < out.size(); ++r) starts[r] = total, total += lengths[r];
    std::string all(static_cast<size_t>(total), '\0');
    REX_MPI(MPI_Allgatherv(text.data(), length, MPI_CHAR, all.data(), lengths.data(), starts.data(),
                           MPI_CHAR, MPI_COMM_WORLD));
    for (size_t r = 0; r < out.size(); ++r) out[r] = all.substr(starts[r], lengths[r]);
#endif
    return out;
  }

  // Tensors, in place, on every rank: the sum (or the mean) over the ranks, and rank 0's values.
  // f32 or i32 on the CPU (MPI); f32 on CUDA (NCCL, queued on rex's stream).
  enum class Reduce { sum, mean };
  void all_reduce(Tensor& t, Reduce op = Reduce::sum) {
    if (size_ == 1) return;
    check_collective_tensor("all_reduce", t);
    if (t.device().is_cuda()) {
      all_reduce_sum_device(t.device_data<float>(), static_cast<size_t>(t.numel()));
    } else {
#if defined(REX_WITH_MPI)
      REX_MPI(MPI_Allreduce(MPI_IN_PLACE, host_bytes(t), checked_count(t.numel()), mpi_type(t),
                            MPI_SUM, MPI_COMM_WORLD));
#endif
    }
    if (op == Reduce::mean) {
      REX_CHECK(t.dtype() == DType::f32, "dist::all_reduce: the mean needs an f32 tensor");
      const float scale = 1.0f / static_cast<float>(size_);
      if (t.device().is_cuda()) {
        rex::detail::cuda_backend().unary(rex::detail::UnaryOp::mul_scalar, scale,
                                          t.device_data<float>(), t.device_data<float>(),
                                          t.numel());
      } else {
        for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] *= scale;
      }
    }
  }
  void broadcast(Tensor& t) {
    if (size_ == 1) return;
    check_collective_tensor("broadcast", t);
    if (t.device().is_cuda()) {
#if defined(REX_WITH_NCCL)
      REX_NCCL(ncclBroadcast(t.device_data<float>(), t.device_data<float>(),
                             static_cast<size_t>(t.numel()), ncclFloat, 0, nccl(),
                             static_cast<cudaStream_t>(rex::cuda::stream_handle())));
#else
      throw_built_without_nccl();
#endif
      return;
    }
#if defined(REX_WITH_MPI)
    REX_MPI(MPI_Bcast(host_bytes(t), checked_count(t.numel()), mpi_type(t), 0, MPI_COMM_WORLD));
#endif
  }

  // Rank 0's text, on every rank.
  std::string broadcast(std::string text) {
#if defined(REX_WITH_MPI)
    if (size_ > 1) {
      int64_t length = static_cast<int64_t>(text.size());
      REX_MPI(MPI_Bcast(&length, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
      text.resize(static_cast<size_t>(length));
      REX_MPI(MPI_Bcast(text.data(), checked_count(text.size()), MPI_CHAR, 0, MPI_COMM_WORLD));
    }
#endif
    return text;
  }

  // Ends this process, and every other rank of the run with it, with `status`: call it after an
  // error, once the message is printed.
  [[noreturn]] void fail(int status) {
    std::fflush(stdout);
    std::fflush(stderr);
#if defined(REX_WITH_MPI)
    if (size_ > 1) MPI_Abort(MPI_COMM_WORLD, status);
#endif
    std::exit(status);
  }

  // "" for one process, " (rank 1 of 4)" otherwise: for messages.
  std::string where() const {
    return size_ == 1 ? std::string()
                      : " (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ")";
  }

  ~Communicator() {
#if defined(REX_WITH_NCCL)
    if (nccl_) ncclCommDestroy(nccl_);
#endif
#if defined(REX_WITH_MPI)
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (started_mpi_ && !finalized) MPI_Finalize();
#endif
  }

 private:
  enum Kind { kDouble, kInt64 };

  Communicator() {
#if defined(REX_WITH_MPI)
    if (!launched_by_mpi()) return;
    int initialized = 0;
    REX_MPI(MPI_Initialized(&initialized));
    if (!initialized) {
      // Only the main thread calls MPI (OpenMP threads compute between the calls).
      int provided = 0;
      REX_MPI(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
      started_mpi_ = true;
    }
    REX_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
    REX_MPI(MPI_Comm_size(MPI_COMM_WORLD, &size_));
#endif
#if defined(REX_WITH_NCCL)
    // One GPU per rank: the ranks of a machine take its GPUs in turn (before rex's first CUDA
    // call makes its stream on the current device). CUDA_VISIBLE_DEVICES narrows the choice.
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (!local) local = std::getenv("SLURM_LOCALID");
    int count = 0;
    if (size_ > 1 && local && cudaGetDeviceCount(&count) == cudaSuccess && count > 1)
      cudaSetDevice(std::atoi(local) % count);
#endif
  }

  void reduce(void* data, size_t n, Kind kind) {
#if defined(REX_WITH_MPI)
    if (size_ > 1)
      REX_MPI(MPI_Allreduce(MPI_IN_PLACE, data, checked_count(n),
                            kind == kDouble ? MPI_DOUBLE : MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD));
#endif
    (void)data, (void)n, (void)kind;
  }

  [[noreturn]] static void throw_built_without_nccl() {
    throw Error(
        "collectives on CUDA tensors need NCCL: this program was built without it (rex::dist_nccl "
        "exists when CMake finds NCCL with the CUDA toolkit and rex::cuda)");
  }
  static void check_collective_tensor(const char* what, const Tensor& t) {
    REX_CHECK(t.defined(), "dist::", what, ": the tensor is undefined");
    REX_CHECK(t.dtype() == DType::f32 || (t.dtype() == DType::i32 && !t.device().is_cuda()),
              "dist::", what, ": f32 tensors (or i32 on the CPU), got ", t.dtype());
  }
  static void* host_bytes(const Tensor& t) {
    return t.dtype() == DType::f32 ? static_cast<void*>(t.data<float>())
                                   : static_cast<void*>(t.data<int32_t>());
  }
#if defined(REX_WITH_MPI)
  static MPI_Datatype mpi_type(const Tensor& t) {
    return t.dtype() == DType::f32 ? MPI_FLOAT : MPI_INT32_T;
  }
#endif

  static int checked_count(int64_t n) { return checked_count(static_cast<size_t>(n)); }
  static int checked_count(size_t n) {
    REX_CHECK(n <= static_cast<size_t>(INT32_MAX), "dist: a collective of ", n,
              " elements is beyond MPI's int count");
    return static_cast<int>(n);
  }

#if defined(REX_WITH_NCCL)
  // NCCL's communicator over the same ranks, made on first use (each rank on its own GPU).
  ncclComm_t nccl() {
    if (!nccl_) {
      ncclUniqueId id;
      if (rank_ == 0) REX_NCCL(ncclGetUniqueId(&id));
      REX_MPI(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD));
      REX_NCCL(ncclCommInitRank(&nccl_, size_, id, rank_));
    }
    return nccl_;
  }
  ncclComm_t nccl_ = nullptr;
#endif

  int rank_ = 0, size_ = 1;
  bool started_mpi_ = false;
};

}  // namespace rex::dist
