// Whole-file reads and atomic whole-file writes.
//
// Checkpoints and tokenizer files are small enough to hold in memory, so files are read and written
// whole. A write goes to "<path>.tmp.<pid>" in the same folder, is flushed to disk with fsync, and
// is then renamed over the target: rename within one file system is atomic, so a crash at any point
// leaves either the old file or the complete new one, never a truncated mix. POSIX calls are used
// (not iostreams) because fsync needs a file descriptor and errno gives the precise reason for a
// failure, which every error message states next to the path. After the rename the folder itself is
// fsynced, so that the new directory entry (not only the file's bytes) survives a power loss.
//
// A writer killed mid-write (kill -9, out of memory) leaves its "<name>.tmp.<pid>" behind, as large
// as the file it was writing. remove_stale_temp_files deletes those of writers that are no longer
// alive (kill(pid, 0) fails with ESRCH) and never one of a live process; runs call it when they
// start or resume in a folder. A pid names a process on this machine only: two machines writing to
// one shared folder must not run it.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <new>
#include <string>
#include <string_view>
#include <vector>

#include "rex/core/error.hpp"

namespace rex::detail {

// errno as words, with the usual causes spelled out for the two most common failures.
inline std::string errno_text(int err, const std::string& folder) {
  if (err == ENOENT) return "folder " + folder + " does not exist";
  if (err == EACCES) return "folder " + folder + " is not writable (permission denied)";
  return std::strerror(err);
}

// The folder holding `path`, for messages ("." for a bare file name).
inline std::string parent_folder(const std::string& path) {
  const std::string parent = std::filesystem::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

// The pid in a temporary file name "<name>.tmp.<pid>", or -1 when the name is not one.
inline pid_t temp_file_pid(const std::string& name) {
  const size_t mark = name.rfind(".tmp.");
  if (mark == std::string::npos || mark == 0) return -1;
  const std::string digits = name.substr(mark + 5);
  if (digits.empty() || digits.size() > 9 ||
      digits.find_first_not_of("0123456789") != std::string::npos)
    return -1;
  return static_cast<pid_t>(std::stol(digits));
}

inline bool process_is_alive(pid_t pid) { return ::kill(pid, 0) == 0 || errno != ESRCH; }

}  // namespace rex::detail

namespace rex::io {

// JSON files rex reads (configs, vocab.json) hold kilobytes; a larger one than this is refused
// before it is read (a wrong path, e.g. a corpus or a checkpoint given as --config).
inline constexpr uint64_t kMaxJsonFileBytes = uint64_t{64} << 20;

// The whole file, at most max_bytes of it (more is an error naming the size; a file that grows
// while read, or a pipe, is cut off there too); running out of memory is a rex::Error as well.
inline std::string read_file(const std::string& path,
                             uint64_t max_bytes = std::numeric_limits<uint64_t>::max()) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw Error(detail::concat("read_file: ", path, ": ",
                               err == ENOENT ? "file does not exist" : std::strerror(err)));
  }
  // Closes the file and reports why reading it failed.
  auto fail = [&](const std::string& reason) {
    ::close(fd);
    throw Error(detail::concat("read_file: ", path, ": ", reason));
  };
  auto too_large = [&](uint64_t bytes) {
    fail(detail::concat("is ", bytes, " bytes or more, above the ", max_bytes,
                        " this file may have (is it the file you meant?)"));
  };
  struct stat info {};
  if (::fstat(fd, &info) != 0) fail(std::strerror(errno));
  if (S_ISDIR(info.st_mode)) fail("is a directory, not a file");
  if (S_ISREG(info.st_mode) && static_cast<uint64_t>(info.st_size) > max_bytes)
    too_large(static_cast<uint64_t>(info.st_size));
  std::string bytes;
  try {
    if (S_ISREG(info.st_mode)) bytes.reserve(static_cast<size_t>(info.st_size));
    char chunk[1 << 16];
    for (;;) {
      const ssize_t got = ::read(fd, chunk, sizeof chunk);
      if (got == 0) break;
      if (got < 0) {
        if (errno == EINTR) continue;
        fail(detail::concat("read failed after ", bytes.size(), " bytes: ", std::strerror(errno)));
      }
      if (bytes.size() + static_cast<uint64_t>(got) > max_bytes) too_large(bytes.size() + got);
      bytes.append(chunk, static_cast<size_t>(got));
    }
  } catch (const std::bad_alloc&) {
    fail(detail::concat("out of memory after reading ", bytes.size(), " of ", info.st_size,
                        " bytes"));
  }
  ::close(fd);
  return bytes;
}

// Makes the folder's entries (a rename into it) durable. File systems that cannot fsync a folder
// (EINVAL) make their entries durable by other means, so that is not an error.
inline void fsync_folder(const std::string& folder) {
  const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int err = fd < 0 ? errno : 0;
  if (fd >= 0) {
    if (::fsync(fd) != 0 && errno != EINVAL) err = errno;
    ::close(fd);
  }
  if (err != 0) throw Error(detail::concat("fsync_folder: ", folder, ": ", std::strerror(err)));
}

inline void write_file_atomic(const std::string& path, std::string_view bytes) {
  const std::string temp = path + ".tmp." + std::to_string(::getpid());
  const std::string folder = detail::parent_folder(path);
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    const int err = errno;
    throw Error(detail::concat("write_file_atomic: ", path, ": cannot create ", temp, ": ",
                               detail::errno_text(err, folder)));
  }
  // Closes (if still open) and removes the temporary file, then reports the failed step.
  bool open = true;
  auto fail = [&](const char* step, int err) {
    if (open) ::close(fd);
    ::unlink(temp.c_str());
    throw Error(detail::concat("write_file_atomic: ", path, ": ", step, ": ",
                               detail::errno_text(err, folder)));
  };
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t put = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (put < 0) {
      if (errno == EINTR) continue;
      fail("write failed", errno);
    }
    written += static_cast<size_t>(put);
  }
  if (::fsync(fd) != 0) fail("fsync failed", errno);
  open = false;
  if (::close(fd) != 0) fail("close failed", errno);
  if (std::rename(temp.c_str(), path.c_str()) != 0) fail("cannot rename the temporary file", errno);
  fsync_folder(folder);
}

// Removes the temporary files of dead writers ("<name>.tmp.<pid>" whose pid is not a live process)
// in `folder`; returns their paths. A folder that does not exist holds none.
inline std::vector<std::string> remove_stale_temp_files(const std::string& folder) {
  std::vector<std::string> removed;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(folder, ec)) {
    const pid_t pid = detail::temp_file_pid(entry.path().filename().string());
    if (pid <= 0 || pid == ::getpid() || detail::process_is_alive(pid) || !entry.is_regular_file())
      continue;
    if (std::filesystem::remove(entry.path(), ec)) removed.push_back(entry.path().string());
  }
  return removed;
}

}  // namespace rex::io
