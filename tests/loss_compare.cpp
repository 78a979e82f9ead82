// Compares two losses given as --demo-loss=X --reference-loss=Y: exit 0 when
// they agree within 1e-5 relative.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

int main(int argc, char** argv) {
    double a = NAN, b = NAN;
    for (int i = 1; i < argc; ++i) {
        if (std::strncmp(argv[i], "--demo-loss=", 12) == 0) a = std::strtod(argv[i] + 12, nullptr);
        if (std::strncmp(argv[i], "--reference-loss=", 17) == 0) b = std::strtod(argv[i] + 17, nullptr);
    }
    double rel = std::fabs(a - b) / std::fabs(b);
    std::printf("demo %.9g, reference %.9g, relative difference %.3g (limit 1e-5)\n", a, b, rel);
    return rel <= 1e-5 ? 0 : 1;
}
