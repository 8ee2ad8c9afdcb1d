// One warning per (op, reason) and process when an op leaves its fast kernel for a slower
// path: a fallback is never silent, and a training loop does not repeat it at every step.
// (TORCH_WARN_ONCE would keep only the first reason of a call site.)
#pragma once

#include <c10/util/Exception.h>

#include <mutex>
#include <set>
#include <string>
#include <utility>

namespace flextron {

// "<op>: <reason> (<shape>); using <fallback>", once per (op, reason).
inline void warn_fallback(const std::string& op, const std::string& reason, const std::string& shape,
                          const std::string& fallback) {
  static std::mutex mutex;
  static std::set<std::pair<std::string, std::string>> warned;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (!warned.emplace(op, reason).second) return;
  }
  TORCH_WARN(op, ": ", reason, " (", shape, "); using ", fallback);
}

}  // namespace flextron
