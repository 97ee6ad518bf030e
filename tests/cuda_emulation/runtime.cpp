// The emulated runtime around memory and kernels: the one device and its properties, streams, and
// error reporting.
//
// The device is an H200 as the CUDA 13 runtime describes it (sm_90, 132 SMs, 1024 threads per
// block, 48 KiB of shared memory per block by default, the grid limits, a 2 GiB maximum pitch);
// the launch checks in execution.cpp enforce the same limits. Streams are handles that order
// nothing: every operation runs to completion when it is issued, which is one valid execution of
// in-order streams, so cudaStreamSynchronize only validates its handle (and counts a host wait for
// counters.cpp). Errors follow CUDA's
// rules for the last error (cudaGetLastError returns and clears it; cudaPeekAtLastError keeps it),
// and each error also keeps an explanation that cudaGetErrorString(code) appends to CUDA's text,
// which is how a failed check reaches rex::Error's message. Unlike a GPU, a failed kernel does not
// poison the context: later calls work, so one process can test many broken kernels.
#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "emulator.hpp"

namespace cuda_emulation::detail {
namespace {

struct ErrorState {
  std::mutex mutex;
  cudaError_t last = cudaSuccess;
  std::map<int, std::string> explained;  // code -> "CUDA's text [rex CUDA emulation: ...]"
};

ErrorState& errors() {
  static auto* state = new ErrorState();
  return *state;
}

struct Streams {
  std::mutex mutex;
  std::set<cudaStream_t> live;
  uintptr_t next = 0x5000;  // handles are opaque tokens, never dereferenced
};

Streams& streams() {
  static auto* state = new Streams();
  return *state;
}

struct Events {
  std::mutex mutex;
  std::set<cudaEvent_t> live;
  uintptr_t next = 0x9000;  // opaque tokens, as streams are
};

Events& events() {
  static auto* state = new Events();
  return *state;
}

cudaError_t check_event(const char* call, cudaEvent_t event) {
  Events& e = events();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (e.live.count(event) != 0) return cudaSuccess;
  return fail(
      cudaErrorInvalidResourceHandle,
      std::string(call) + ": " + hex(reinterpret_cast<uintptr_t>(event)) + " is not a live event");
}

// Every error code the emulation returns, with CUDA's name and text for it.
struct ErrorText {
  cudaError_t code;
  const char* name;
  const char* text;
};
constexpr ErrorText kErrors[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation", "out of memory"},
    {cudaErrorInitializationError, "cudaErrorInitializationError", "initialization error"},
    {cudaErrorInvalidConfiguration, "cudaErrorInvalidConfiguration",
     "invalid configuration argument"},
    {cudaErrorInvalidPitchValue, "cudaErrorInvalidPitchValue", "invalid pitch argument"},
    {cudaErrorInvalidDevicePointer, "cudaErrorInvalidDevicePointer", "invalid device pointer"},
    {cudaErrorInvalidMemcpyDirection, "cudaErrorInvalidMemcpyDirection",
     "invalid copy direction for memcpy"},
    {cudaErrorNoDevice, "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorInvalidResourceHandle, "cudaErrorInvalidResourceHandle", "invalid resource handle"},
    {cudaErrorNotReady, "cudaErrorNotReady", "device not ready"},
    {cudaErrorIllegalAddress, "cudaErrorIllegalAddress",
     "an illegal memory access was encountered"},
    {cudaErrorLaunchOutOfResources, "cudaErrorLaunchOutOfResources",
     "too many resources requested for launch"},
    {cudaErrorMisalignedAddress, "cudaErrorMisalignedAddress", "misaligned address"},
    {cudaErrorLaunchFailure, "cudaErrorLaunchFailure", "unspecified launch failure"},
};

const ErrorText* find_error(cudaError_t error) {
  for (const ErrorText& e : kErrors)
    if (e.code == error) return &e;
  return nullptr;
}

const char* standard_text(cudaError_t error) {
  const ErrorText* e = find_error(error);
  return e ? e->text : "unrecognized error code";
}

cudaDeviceProp make_h200() {
  cudaDeviceProp p{};
  const std::string name = "NVIDIA H200 (rex CUDA emulation on the CPU)";
  std::copy(name.begin(), name.end(), p.name);
  p.totalGlobalMem = size_t{143771} << 20;
  p.sharedMemPerBlock = 48 * 1024;
  p.regsPerBlock = 65536;
  p.warpSize = 32;
  p.memPitch = 2147483647;
  p.maxThreadsPerBlock = 1024;
  p.maxThreadsDim[0] = 1024;
  p.maxThreadsDim[1] = 1024;
  p.maxThreadsDim[2] = 64;
  p.maxGridSize[0] = 2147483647;
  p.maxGridSize[1] = 65535;
  p.maxGridSize[2] = 65535;
  p.totalConstMem = 65536;
  p.major = 9;
  p.minor = 0;
  p.multiProcessorCount = 132;
  p.l2CacheSize = 50 * 1024 * 1024;
  p.maxThreadsPerMultiProcessor = 2048;
  p.sharedMemPerMultiprocessor = 228 * 1024;
  p.sharedMemPerBlockOptin = 227 * 1024;
  return p;
}

}  // namespace

const cudaDeviceProp& device_properties() {
  static const cudaDeviceProp properties = make_h200();
  return properties;
}

cudaError_t fail(cudaError_t code, const std::string& message) {
  ErrorState& e = errors();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.last = code;
  e.explained[code] = std::string(standard_text(code)) + " [rex CUDA emulation: " + message + "]";
  return code;
}

cudaError_t check_stream(const char* call, cudaStream_t stream) {
  if (stream == nullptr) return cudaSuccess;
  Streams& s = streams();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.live.count(stream) != 0) return cudaSuccess;
  return fail(cudaErrorInvalidResourceHandle, std::string(call) + ": " +
                                                  hex(reinterpret_cast<uintptr_t>(stream)) +
                                                  " is not a live stream");
}

}  // namespace cuda_emulation::detail

using namespace cuda_emulation::detail;

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return fail(cudaErrorInvalidValue, "cudaGetDeviceCount: null pointer");
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return fail(cudaErrorInvalidValue, "cudaGetDevice: null pointer");
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0)
    return fail(cudaErrorInvalidDevice,
                "cudaSetDevice(" + std::to_string(device) + "): the emulation has device 0 only");
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (prop == nullptr) return fail(cudaErrorInvalidValue, "cudaGetDeviceProperties: null pointer");
  if (device != 0)
    return fail(cudaErrorInvalidDevice, "cudaGetDeviceProperties(" + std::to_string(device) +
                                            "): the emulation has device 0 only");
  *prop = device_properties();
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: null pointer");
  if (device != 0)
    return fail(cudaErrorInvalidDevice, "cudaDeviceGetAttribute: device " + std::to_string(device) +
                                            " (the emulation has 0 only)");
  const cudaDeviceProp& p = device_properties();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = p.maxThreadsPerBlock;
      break;
    case cudaDevAttrMaxBlockDimX:
      *value = p.maxThreadsDim[0];
      break;
    case cudaDevAttrMaxBlockDimY:
      *value = p.maxThreadsDim[1];
      break;
    case cudaDevAttrMaxBlockDimZ:
      *value = p.maxThreadsDim[2];
      break;
    case cudaDevAttrMaxGridDimX:
      *value = p.maxGridSize[0];
      break;
    case cudaDevAttrMaxGridDimY:
      *value = p.maxGridSize[1];
      break;
    case cudaDevAttrMaxGridDimZ:
      *value = p.maxGridSize[2];
      break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(p.sharedMemPerBlock);
      break;
    case cudaDevAttrWarpSize:
      *value = p.warpSize;
      break;
    case cudaDevAttrMaxPitch:
      *value = static_cast<int>(p.memPitch);
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = p.multiProcessorCount;
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = p.major;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = p.minor;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(p.sharedMemPerBlockOptin);
      break;
    default:
      return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute " +
                                             std::to_string(static_cast<int>(attr)) +
                                             " is not emulated");
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  count_host_wait(HostWait::device_synchronize);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  ErrorState& e = errors();
  std::lock_guard<std::mutex> lock(e.mutex);
  const cudaError_t last = e.last;
  e.last = cudaSuccess;
  return last;
}

cudaError_t cudaPeekAtLastError() {
  ErrorState& e = errors();
  std::lock_guard<std::mutex> lock(e.mutex);
  return e.last;
}

const char* cudaGetErrorName(cudaError_t error) {
  const ErrorText* e = find_error(error);
  return e ? e->name : "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  ErrorState& e = errors();
  std::lock_guard<std::mutex> lock(e.mutex);
  const auto it = e.explained.find(error);
  return it == e.explained.end() ? standard_text(error) : it->second.c_str();
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, 0); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  if (stream == nullptr) return fail(cudaErrorInvalidValue, "cudaStreamCreate: null pointer");
  if (flags != cudaStreamDefault && flags != cudaStreamNonBlocking)
    return fail(cudaErrorInvalidValue,
                "cudaStreamCreateWithFlags: unknown flags " + std::to_string(flags));
  Streams& s = streams();
  std::lock_guard<std::mutex> lock(s.mutex);
  *stream = reinterpret_cast<cudaStream_t>(s.next);
  s.next += 0x10;
  s.live.insert(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (const cudaError_t e = check_stream("cudaStreamDestroy", stream)) return e;
  if (stream == nullptr) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy(null)");
  Streams& s = streams();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.live.erase(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (const cudaError_t e = check_stream("cudaStreamSynchronize", stream)) return e;
  count_host_wait(HostWait::stream_synchronize);
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  if (event == nullptr) return fail(cudaErrorInvalidValue, "cudaEventCreate: null pointer");
  if (flags != cudaEventDefault && flags != cudaEventDisableTiming)
    return fail(cudaErrorInvalidValue,
                "cudaEventCreateWithFlags: unknown flags " + std::to_string(flags));
  Events& e = events();
  std::lock_guard<std::mutex> lock(e.mutex);
  *event = reinterpret_cast<cudaEvent_t>(e.next);
  e.next += 0x10;
  e.live.insert(*event);
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (const cudaError_t e = check_event("cudaEventDestroy", event)) return e;
  Events& e = events();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.live.erase(event);
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (const cudaError_t e = check_event("cudaEventRecord", event)) return e;
  return check_stream("cudaEventRecord", stream);
}

// Never cudaErrorNotReady here: the work before a recorded event has already run.
cudaError_t cudaEventQuery(cudaEvent_t event) { return check_event("cudaEventQuery", event); }
