// Ctrl-C as a request, not a kill: after catch_interrupts(), the first SIGINT only sets a flag that
// the training loop reads between steps (to save and exit cleanly); a second one ends the program
// at once, as usual.
#pragma once

#include <atomic>
#include <csignal>

namespace rex::detail {

inline std::atomic<bool> g_interrupted{false};

extern "C" inline void rex_interrupt_handler(int) {
  g_interrupted = true;
  std::signal(SIGINT, SIG_DFL);
}

}  // namespace rex::detail

namespace rex::train {

inline void catch_interrupts() { std::signal(SIGINT, rex::detail::rex_interrupt_handler); }

// Whether Ctrl-C was pressed since catch_interrupts().
inline bool interrupted() { return rex::detail::g_interrupted; }

}  // namespace rex::train
