#include <oomguard/errors.hpp>

#include <doctest/doctest.h>

#include "support/valid_utf8.hpp"

#include <cstring>
#include <string>
#include <string_view>

using namespace oomguard;

TEST_CASE("out_of_memory carries every figure of PyTorch's message") {
    oom_info i;
    i.device = 0;
    i.requested = 80ull << 20;
    i.total = static_cast<std::size_t>(79.35 * (1ull << 30));
    i.free = static_cast<std::size_t>(37.19 * (1ull << 20));
    i.budget_used = static_cast<std::size_t>(76.70 * (1ull << 30));
    i.budget_limit = 78ull << 30;
    out_of_memory e(i);
    std::string w = e.what();
    CHECK(w.find("tried to allocate 80.00 MiB on GPU 0") != std::string::npos);
    CHECK(w.find("79.35 GiB total") != std::string::npos);
    CHECK(w.find("37.19 MiB free") != std::string::npos);
    CHECK(w.find("76.70 GiB held under this budget of 78.00 GiB") != std::string::npos);
    CHECK(w.find("cudaErrorMemoryAllocation") != std::string::npos);
    CHECK(w.find("Advice:") != std::string::npos);
    CHECK(e.requested() == (80ull << 20));
    CHECK(e.device() == 0);
    std::bad_alloc const& base = e;  // catchable as std::bad_alloc
    CHECK(std::string(base.what()) == w);
}

TEST_CASE("a budget denial says so, and unknown figures are named unknown") {
    oom_info i;
    i.device = 3;
    i.requested = 1000;
    i.backend = "simulated";
    i.source = oom_source::budget;
    std::string w = out_of_memory(i).what();
    CHECK(w.find("GPU 3 (simulated)") != std::string::npos);
    CHECK(w.find("unknown total, unknown free") != std::string::npos);
    CHECK(w.find("denied by the budget") != std::string::npos);
    CHECK(w.find("held under this budget") == std::string::npos);  // no budget limit known
}

TEST_CASE("cuda_error and no_device_error name the code") {
    cuda_error e(status{status_kind::sticky, 700, "cudaErrorIllegalAddress"}, "synchronize");
    CHECK(e.is_sticky());
    CHECK(e.code() == 700);
    CHECK(std::string(e.what()).find("cudaErrorIllegalAddress (code 700, sticky)") != std::string::npos);

    no_device_error n(status{status_kind::no_device, 35, "cudaErrorInsufficientDriver"}, "counting devices");
    CHECK(std::string(n.what()).find("no usable CUDA device") != std::string::npos);
    CHECK(std::string(n.what()).find("cudaErrorInsufficientDriver") != std::string::npos);
    CHECK(n.kind() == status_kind::no_device);
    CHECK_THROWS_AS(detail::throw_status(status{status_kind::no_device, 100, "cudaErrorNoDevice"}, "x"),
                    no_device_error);
    CHECK_THROWS_AS(detail::throw_status(status{status_kind::other, 999, "cudaErrorUnknown"}, "x"), cuda_error);
}

TEST_CASE("format_bytes uses binary units with two decimals") {
    CHECK(std::string(detail::format_bytes(0).c_str()) == "0 B");
    CHECK(std::string(detail::format_bytes(1023).c_str()) == "1023 B");
    CHECK(std::string(detail::format_bytes(1024).c_str()) == "1.00 KiB");
    CHECK(std::string(detail::format_bytes(80ull << 20).c_str()) == "80.00 MiB");
    CHECK(std::string(detail::format_bytes(~std::size_t{0}).c_str()) == "16.00 EiB");
}

TEST_CASE("Message truncates long texts instead of overflowing") {
    detail::Message m;
    std::string big(5000, 'x');
    m << big << 42;
    CHECK(m.view().size() == 1023);
    CHECK(m.view().substr(1020) == "...");
    detail::Message n;
    n << "a" << 1 << ' ' << -2L << ' ' << 3ull << ' ' << 0.5 << ' ' << static_cast<char const*>(nullptr);
    CHECK(std::string(n.c_str()) == "a1 -2 3 0.5 (null)");
}

TEST_CASE("a cut text ends on a code point boundary: no lead byte or part of a sequence before the \"...\"") {
    // Each length of sequence, landing on the cut at each of its offsets: a filler of
    // ASCII shifts the sequences past the boundary one byte at a time.
    for (std::string seq : {"\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80"}) {
        for (std::size_t fill = 1000; fill < 1024; ++fill) {
            std::string text = std::string(fill, 'a');
            while (text.size() < 1100) text += seq;
            CAPTURE(seq.size());
            CAPTURE(fill);
            // One piece; the sequences as a piece of their own each; every byte a piece.
            detail::Message whole, pieces, bytes;
            whole << text;
            pieces << std::string(fill, 'a');
            for (std::size_t k = fill; k < text.size(); k += seq.size()) pieces << seq;
            for (char c : text) bytes << c;
            for (detail::Message const* m : {&whole, &pieces, &bytes}) {
                std::string_view v = m->view();
                REQUIRE(v.size() >= 3);
                CHECK(v.substr(v.size() - 3) == "...");
                std::string_view kept = v.substr(0, v.size() - 3);
                CHECK(test_support::valid_utf8(kept));
                CHECK(text.compare(0, kept.size(), kept) == 0);  // a prefix of what was written
                CHECK(kept.size() + 3 + seq.size() > 1023);        // no more cut than a sequence
                CHECK(std::strlen(m->c_str()) == v.size());
            }
            // Nothing is appended after a cut, though the cut left room.
            std::string before(whole.view());
            whole << "z" << 1;
            CHECK(whole.view() == before);
            // FixedText cuts the same way.
            std::string small(fill % 61, 'a');
            while (small.size() < 80) small += seq;
            detail::FixedText<64> f(small);
            CHECK(f.view().substr(f.size() - 3) == "...");
            CHECK(test_support::valid_utf8(f.view().substr(0, f.size() - 3)));
        }
    }
    // A text that fits whole is not touched, however it ends.
    detail::Message m;
    m << std::string(1019, 'a') << "\xf0\x9f\x98\x80";
    CHECK(m.view().size() == 1023);
    CHECK(test_support::valid_utf8(m.view()));
    CHECK(m.view().substr(1019) == "\xf0\x9f\x98\x80");
}

TEST_CASE("the advice follows the adaptive_batch step marker, nested and after a throw") {
    oom_info device;
    device.device = 0;
    device.requested = 1000;
    oom_info budget = device;
    budget.source = oom_source::budget;
    auto says = [](oom_info const& i, char const* text) {
        return std::string(out_of_memory(i).what()).find(text) != std::string::npos;
    };
    CHECK_FALSE(detail::in_adaptive_step());
    CHECK(says(device, "Advice: outside an adaptive_batch step (setup: model weights, optimizer state) a smaller "
                       "batch does not help: free memory held elsewhere"));
    CHECK(says(budget, "Advice: outside an adaptive_batch step (setup: model weights, optimizer state) a smaller "
                       "batch does not help: raise the budget"));
    CHECK_FALSE(says(device, "lower the batch"));
    CHECK_FALSE(says(budget, "lower the batch"));
    {
        detail::AdaptiveStepScope outer;
        {
            detail::AdaptiveStepScope inner;
            CHECK(detail::adaptive_step_depth() == 2);
        }
        CHECK(detail::in_adaptive_step());
        CHECK(says(device, "Advice: release caches (ScopedCacheRelease), lower the batch"));
        CHECK(says(budget, "Advice: lower the batch (adaptive_batch does it for you) or raise the budget."));
        CHECK_FALSE(says(budget, "outside an adaptive_batch step"));
    }
    try {
        detail::AdaptiveStepScope scope;
        throw out_of_memory(device);
    } catch (out_of_memory const& e) {
        CHECK(std::string(e.what()).find("lower the batch") != std::string::npos);  // built inside the step
    }
    CHECK(detail::adaptive_step_depth() == 0);  // unwinding left the step
    CHECK(says(device, "outside an adaptive_batch step"));
}
