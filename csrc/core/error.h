// Errors raised by the core. The bindings map them to Python exceptions:
// std::invalid_argument -> ValueError, std::overflow_error -> OverflowError,
// std::bad_alloc -> MemoryError. Messages name the offending argument.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace lk {

template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

#define LK_CHECK(cond, ...)                                        \
  do {                                                             \
    if (!(cond)) throw std::invalid_argument(::lk::cat(__VA_ARGS__)); \
  } while (0)

}  // namespace lk
