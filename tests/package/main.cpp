// A program that includes only <rex/rex.hpp>: built by the header_only_compile test with nothing
// but include/ and Eigen on the include path, and by the package tests as a downstream consumer.
#include <rex/rex.hpp>

int main() {
  rex::Tensor x = rex::ones({2, 3}).requires_grad_();
  rex::sum(x * x).backward();
  const bool ok = rex::sum(x.grad()).item() == 12.0f;  // d/dx sum(x^2) = 2x = 2 at six places
  return ok ? 0 : 1;
}
