// Compares two losses given as --demo-loss=X --reference-loss=Y: exit 0 when
// they agree within --limit=L relative (default 1e-5); exit 2 on a missing or
// malformed argument.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {
bool number(char const* text, double& out) {
    char* end = nullptr;
    out = std::strtod(text, &end);
    return end != text && *end == '\0' && std::isfinite(out);
}
}  // namespace

int main(int argc, char** argv) {
    double a = NAN, b = NAN, limit = 1e-5;
    for (int i = 1; i < argc; ++i) {
        bool ok = true;
        if (std::strncmp(argv[i], "--demo-loss=", 12) == 0) ok = number(argv[i] + 12, a);
        else if (std::strncmp(argv[i], "--reference-loss=", 17) == 0) ok = number(argv[i] + 17, b);
        else if (std::strncmp(argv[i], "--limit=", 8) == 0) ok = number(argv[i] + 8, limit) && limit > 0;
        else ok = false;
        if (!ok) {
            std::fprintf(stderr, "loss_compare: bad argument '%s' (--demo-loss=X --reference-loss=Y [--limit=L])\n",
                         argv[i]);
            return 2;
        }
    }
    if (std::isnan(a) || std::isnan(b) || b == 0) {
        std::fprintf(stderr, "loss_compare: give --demo-loss=X and a nonzero --reference-loss=Y\n");
        return 2;
    }
    double rel = std::fabs(a - b) / std::fabs(b);
    std::printf("demo %.9g, reference %.9g, relative difference %.3g (limit %g)\n", a, b, rel, limit);
    return rel <= limit ? 0 : 1;
}
