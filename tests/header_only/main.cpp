// Compiled by the header_only_compile test with nothing but include/ and Eigen on the include path.
#include <rex/rex.hpp>

int main() { return rex::sum(rex::ones({2, 3})).item() == 6.0f ? 0 : 1; }
