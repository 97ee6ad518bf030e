// DeviceCounts: n integer counts that a device computed (a MoE layer's routed slots per expert),
// kept there as offsets [n + 1] (offset e + 1 - offset e is count e) and read by the host only
// when something asks, then once: every copy of a handle shares what was read. read_counts reads
// any number of them with one copy from the device: train::read_steps reads every MoE layer's
// counts of every queued step that way, on log steps only. On the CPU the counts are known at
// once.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "rex/core/device_memory.hpp"
#include "rex/core/tensor.hpp"

namespace rex {

class DeviceCounts {
 public:
  DeviceCounts() = default;  // undefined: counts nothing
  // Counts known on the host, as offsets [n + 1] from 0.
  static DeviceCounts on_host(std::vector<int64_t> offsets) {
    DeviceCounts out;
    out.state_ = std::make_shared<State>();
    out.state_->n = static_cast<int64_t>(offsets.size()) - 1;
    out.state_->offsets = std::move(offsets);
    return out;
  }
  // Offsets [n + 1] (int64) in device memory owned by `buffer`.
  static DeviceCounts on_device(std::shared_ptr<void> buffer, int64_t n) {
    DeviceCounts out;
    out.state_ = std::make_shared<State>();
    out.state_->n = n;
    out.state_->device = std::move(buffer);
    return out;
  }

  bool defined() const { return state_ != nullptr; }
  int64_t size() const { return state_ ? state_->n : 0; }
  // Whether the host has the values (reading them would not wait for the device).
  bool known() const { return state_ && state_->offsets.has_value(); }
  // Whether the values are on the device and the host has not read them.
  bool only_on_device() const { return state_ && state_->device && !state_->offsets; }
  // The offsets [n + 1] in device memory (null when the counts were made on the host).
  const int64_t* device_offsets() const {
    return state_ ? static_cast<const int64_t*>(state_->device.get()) : nullptr;
  }
  // The offsets [n + 1] on the host: read from the device (one wait) the first time.
  inline const std::vector<int64_t>& offsets() const;
  int64_t operator[](size_t e) const { return offsets()[e + 1] - offsets()[e]; }
  int64_t back() const { return (*this)[static_cast<size_t>(size() - 1)]; }
  std::vector<int64_t> host() const {
    std::vector<int64_t> out(static_cast<size_t>(size()));
    for (size_t e = 0; e < out.size(); ++e) out[e] = (*this)[e];
    return out;
  }
  friend bool operator==(const DeviceCounts& a, const std::vector<int64_t>& b) {
    return a.host() == b;
  }
  friend bool operator==(const DeviceCounts& a, const DeviceCounts& b) {
    return a.host() == b.host();
  }

  friend void read_counts(const std::vector<const DeviceCounts*>& all);

 private:
  struct State {
    int64_t n = 0;
    std::shared_ptr<void> device;                 // offsets [n + 1] int64, or null
    std::optional<std::vector<int64_t>> offsets;  // on the host, once read
  };
  std::shared_ptr<State> state_;
};

// Reads every counts in `all` not yet on the host with one copy from the device (their offsets
// are first gathered into one device buffer, which costs no wait).
inline void read_counts(const std::vector<const DeviceCounts*>& all) {
  using State = DeviceCounts::State;
  std::vector<State*> unread;
  size_t words = 0;
  for (const DeviceCounts* c : all)
    if (c && c->state_ && !c->state_->offsets) {
      bool seen = false;
      for (State* s : unread) seen = seen || s == c->state_.get();
      if (seen) continue;
      unread.push_back(c->state_.get());
      words += static_cast<size_t>(c->state_->n + 1);
    }
  if (unread.empty()) return;
  const detail::DeviceMemory& memory = detail::device_memory();
  std::vector<int64_t> host(words);
  const void* source = unread.front()->device.get();
  std::shared_ptr<void> staging;  // released even if a copy throws
  if (unread.size() > 1) {
    staging = std::shared_ptr<void>(memory.allocate(words * sizeof(int64_t)),
                                    [release = memory.release](void* p) { release(p); });
    size_t at = 0;
    for (State* s : unread) {
      const size_t n = static_cast<size_t>(s->n + 1);
      memory.copy(static_cast<int64_t*>(staging.get()) + at, s->device.get(), n * sizeof(int64_t),
                  detail::DeviceCopy::device_to_device);
      at += n;
    }
    source = staging.get();
  }
  memory.copy(host.data(), source, words * sizeof(int64_t), detail::DeviceCopy::device_to_host);
  size_t at = 0;
  for (State* s : unread) {
    const auto n = static_cast<std::ptrdiff_t>(s->n + 1);
    s->offsets.emplace(host.begin() + static_cast<std::ptrdiff_t>(at),
                       host.begin() + static_cast<std::ptrdiff_t>(at) + n);
    at += static_cast<size_t>(n);
  }
}

inline const std::vector<int64_t>& DeviceCounts::offsets() const {
  REX_CHECK(state_, "DeviceCounts: undefined counts were read");
  if (!state_->offsets) read_counts({this});
  return *state_->offsets;
}

}  // namespace rex
