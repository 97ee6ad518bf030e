// Whole-file reads and atomic whole-file writes.
//
// Checkpoints and tokenizer files are small enough to hold in memory, so files are read and written
// whole. A write goes to "<path>.tmp.<pid>" in the same folder, is flushed to disk with fsync, and
// is then renamed over the target: rename within one file system is atomic, so a crash at any point
// leaves either the old file or the complete new one, never a truncated mix. POSIX calls are used
// (not iostreams) because fsync needs a file descriptor and errno gives the precise reason for a
// failure, which every error message states next to the path.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

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

}  // namespace rex::detail

namespace rex::io {

inline std::string read_file(const std::string& path) {
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
  struct stat info {};
  if (::fstat(fd, &info) != 0) fail(std::strerror(errno));
  if (S_ISDIR(info.st_mode)) fail("is a directory, not a file");
  std::string bytes;
  if (S_ISREG(info.st_mode)) bytes.reserve(static_cast<size_t>(info.st_size));
  char chunk[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd, chunk, sizeof chunk);
    if (got == 0) break;
    if (got < 0) {
      if (errno == EINTR) continue;
      fail(detail::concat("read failed after ", bytes.size(), " bytes: ", std::strerror(errno)));
    }
    bytes.append(chunk, static_cast<size_t>(got));
  }
  ::close(fd);
  return bytes;
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
}

}  // namespace rex::io
