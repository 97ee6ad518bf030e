// rex::Error and the REX_CHECK macro.
//
// Every user-facing failure (bad shapes, wrong dtype, released graph, bad files) throws rex::Error
// with a message that names the operation and the values involved, so a caller can print e.what()
// and exit.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace rex {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// Streams every argument into one string: concat("matmul: ", shape, " vs ", other).
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

}  // namespace detail
}  // namespace rex

// REX_CHECK(cond, parts...) throws rex::Error(concat(parts...)) when cond is false.
#define REX_CHECK(cond, ...)                                             \
  do {                                                                   \
    if (!(cond)) throw ::rex::Error(::rex::detail::concat(__VA_ARGS__)); \
  } while (0)
