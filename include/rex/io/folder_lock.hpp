// One writer per run folder: an exclusive lock on "<folder>/.lock".
//
// A training run writes many files into its folder (checkpoints, the model folder, metrics.jsonl);
// two runs given the same folder would interleave them without an error. RunFolderLock holds
// flock(LOCK_EX | LOCK_NB) on the folder's lock file for as long as it lives, so a second writer is
// refused at once (it does not wait) with an error naming the holder. The holder writes its PID
// and host name into the lock file once it has the lock; a refused process only reads it.
//
// The kernel drops a flock when the last descriptor of the open file closes, also when the process
// dies (kill -9, out of memory), so a lock is never left stale: the file stays, holding the last
// holder's name, which is read only while its lock is held. The descriptor is O_CLOEXEC, so that
// programs the holder starts do not hold the lock. flock locks an open file, not a process: a
// second RunFolderLock on the same folder in the same process is refused too. On NFS, Linux turns
// flock into a lock the server arbitrates between machines; the host name says where to look.
// Readers (evaluation, sampling) take no lock: every file but metrics.jsonl is replaced by rename.
// scripts/study.py locks its study folder the same way (same file name and content).
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>

#include "rex/core/error.hpp"
#include "rex/io/files.hpp"

namespace rex::detail {

// This machine's name, for the lock file ("unknown" when the system will not say).
inline std::string host_name() {
  char name[HOST_NAME_MAX + 1] = {};
  if (::gethostname(name, sizeof name - 1) != 0 || name[0] == '\0') return "unknown";
  return name;
}

// "PID 1234 on host abc" from a lock file's "<pid> <host>" line; a holder that has not written it
// yet (it has the lock but not yet its line) is "another process".
inline std::string describe_lock_holder(const std::string& line) {
  std::istringstream fields(line);
  long pid = 0;
  std::string host;
  if (fields >> pid >> host && pid > 0) return "PID " + std::to_string(pid) + " on host " + host;
  return "another process";
}

}  // namespace rex::detail

namespace rex::io {

inline constexpr const char* kLockFileName = ".lock";

class RunFolderLock {
 public:
  // Locks `folder`, which must exist, for this process; throws naming the holder when another
  // process (or another RunFolderLock of this one) has it.
  explicit RunFolderLock(std::string folder) : folder_(std::move(folder)) {
    const std::string path = lock_file();
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd_ < 0) {
      const int err = errno;
      throw Error(detail::concat("cannot lock run folder ", folder_, " (lock file ", path,
                                 "): ", detail::errno_text(err, folder_)));
    }
    int status;
    do {
      status = ::flock(fd_, LOCK_EX | LOCK_NB);
    } while (status != 0 && errno == EINTR);
    if (status != 0) {
      const int err = errno;
      if (err == EWOULDBLOCK) {
        char line[256] = {};
        const ssize_t got = ::pread(fd_, line, sizeof line - 1, 0);
        release();
        throw Error(detail::concat("run folder ", folder_, " is in use by ",
                                   detail::describe_lock_holder(
                                       got > 0 ? std::string(line, static_cast<size_t>(got)) : ""),
                                   " (lock file ", path, "); wait for it to finish or stop it"));
      }
      release();
      throw Error(detail::concat("cannot lock run folder ", folder_, " (lock file ", path,
                                 "): ", std::strerror(err)));
    }
    const std::string holder = std::to_string(::getpid()) + " " + detail::host_name() + "\n";
    const ssize_t written =
        ::ftruncate(fd_, 0) == 0 ? ::pwrite(fd_, holder.data(), holder.size(), 0) : -1;
    if (written != static_cast<ssize_t>(holder.size())) {
      const int err = written < 0 ? errno : EIO;
      release();
      throw Error(detail::concat("cannot write this process into the lock file ", path, ": ",
                                 std::strerror(err)));
    }
  }

  RunFolderLock(RunFolderLock&& other) noexcept
      : folder_(std::move(other.folder_)), fd_(std::exchange(other.fd_, -1)) {}
  RunFolderLock& operator=(RunFolderLock&& other) noexcept {
    if (this != &other) {
      release();
      folder_ = std::move(other.folder_);
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;
  ~RunFolderLock() { release(); }

  const std::string& folder() const { return folder_; }
  std::string lock_file() const { return folder_ + "/" + kLockFileName; }

 private:
  void release() {
    if (fd_ >= 0) ::close(fd_);  // closing the last descriptor drops the flock
    fd_ = -1;
  }

  std::string folder_;
  int fd_ = -1;
};

}  // namespace rex::io
