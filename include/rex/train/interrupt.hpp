// Ctrl-C and SIGTERM as a request, not a kill: after catch_interrupts(), the first SIGINT or
// SIGTERM (what SLURM, Kubernetes and `timeout` send) only records the signal, which the training
// loop reads between steps (to save and exit cleanly); a second one ends the program at once, as
// usual.
#pragma once

#include <atomic>
#include <csignal>

namespace rex::detail {

inline std::atomic<int> g_interrupt_signal{0};

extern "C" inline void rex_interrupt_handler(int signal) {
  g_interrupt_signal = signal;
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
}

}  // namespace rex::detail

namespace rex::train {

inline void catch_interrupts() {
  std::signal(SIGINT, rex::detail::rex_interrupt_handler);
  std::signal(SIGTERM, rex::detail::rex_interrupt_handler);
}

// Whether SIGINT or SIGTERM arrived since catch_interrupts().
inline bool interrupted() { return rex::detail::g_interrupt_signal != 0; }

// The exit status of a program that stopped for that signal: 128 + its number (130 for SIGINT,
// 143 for SIGTERM), as a shell reports a process it killed.
inline int interrupted_exit_status() { return 128 + rex::detail::g_interrupt_signal; }

}  // namespace rex::train
