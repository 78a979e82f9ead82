#include <oomguard/classify.hpp>

#include <doctest/doctest.h>

#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

using namespace oomguard;

namespace {
// Stands in for libtorch's c10::OutOfMemoryError, which oomguard cannot know.
struct TorchLikeOom : std::runtime_error {
    TorchLikeOom() : std::runtime_error("CUDA OOM (torch)") {}
};
// Mimics c10::OutOfMemoryError: derives from std::exception only (through c10::Error).
struct C10LikeOom : std::exception {
    char const* what() const noexcept override {
        return "CUDA out of memory. Tried to allocate 80.00 MiB (GPU 0; 79.35 GiB total capacity)";
    }
};
struct C10LikeError : std::exception {
    char const* what() const noexcept override { return "CUDA error: an illegal memory access was encountered"; }
};
// Mimics thrust::system::detail::bad_alloc, which keeps only a string.
struct ThrustLikeBadAlloc : std::bad_alloc {
    char const* what() const noexcept override {
        return "std::bad_alloc: cudaErrorMemoryAllocation: out of memory";
    }
};
}  // namespace

TEST_CASE("oomguard's own types") {
    CHECK(is_device_oom(out_of_memory(oom_info{})));
    CHECK_FALSE(is_device_oom(cuda_error(status{status_kind::sticky, 700, "cudaErrorIllegalAddress"}, "x")));
    CHECK_FALSE(is_device_oom(no_device_error(status{status_kind::no_device, 35, "cudaErrorInsufficientDriver"}, "x")));
    // Even a cuda_error whose text mentions memory is not an OOM: the type decides.
    CHECK_FALSE(is_device_oom(cuda_error(status{status_kind::other, 2, "out of memory"}, "x")));
}

TEST_CASE("text-only errors from Thrust and cudart wrappers") {
    CHECK(is_device_oom(ThrustLikeBadAlloc{}));
    CHECK(is_device_oom(std::runtime_error("transform: failed: cudaErrorMemoryAllocation: out of memory")));
    CHECK_FALSE(is_device_oom(std::bad_alloc{}));  // a host `new` failure
    CHECK_FALSE(is_device_oom(std::runtime_error("cudaErrorIllegalAddress: an illegal memory access")));
    CHECK_FALSE(is_device_oom(std::invalid_argument("bad batch")));
    CHECK_FALSE(is_device_oom(std::logic_error("index 7 past the end")));
    CHECK(is_device_oom(std::runtime_error("cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY")));  // the driver API
    CHECK(is_device_oom(std::runtime_error("std::bad_alloc: oomguard: out of memory: tried to allocate 4.00 KiB")));
}

TEST_CASE("host errors that say \"out of memory\" are not device OOMs") {
    CHECK_FALSE(is_device_oom(std::runtime_error("loader: host ran out of memory while reading shard 7")));
    CHECK_FALSE(is_device_oom(std::runtime_error("cudaHostAlloc: out of memory")));
    CHECK_FALSE(is_device_oom(std::runtime_error("out of memory")));
}

TEST_CASE("libtorch's OOM is recognised by its text, its other errors are not") {
    CHECK(is_device_oom(C10LikeOom{}));
    CHECK_FALSE(is_device_oom(C10LikeError{}));
}

TEST_CASE("user rules, registered and unregistered") {
    CHECK_FALSE(is_device_oom(TorchLikeOom{}));
    {
        auto reg = register_oom_rule(
            [](std::exception const& e) { return dynamic_cast<TorchLikeOom const*>(&e) != nullptr; });
        CHECK(is_device_oom(TorchLikeOom{}));
        CHECK_FALSE(is_device_oom(std::runtime_error("other")));
        auto moved = std::move(reg);
        CHECK(is_device_oom(TorchLikeOom{}));
    }
    CHECK_FALSE(is_device_oom(TorchLikeOom{}));
}

TEST_CASE("a rule that throws does not recognise the exception") {
    auto reg = register_oom_rule([](std::exception const&) -> bool { throw std::runtime_error("rule bug"); });
    CHECK_FALSE(is_device_oom(std::runtime_error("x")));
}

TEST_CASE("rule slots are bounded and a null rule is refused") {
    CHECK_THROWS_AS((void)register_oom_rule(nullptr), std::invalid_argument);
    std::vector<OomRuleRegistration> regs;
    auto rule = [](std::exception const&) { return false; };
    for (std::size_t i = 0; i < detail::max_oom_rules; ++i) regs.push_back(register_oom_rule(rule));
    CHECK_THROWS_AS((void)register_oom_rule(rule), std::length_error);
    regs.pop_back();
    CHECK_NOTHROW(regs.push_back(register_oom_rule(rule)));
}

TEST_CASE("exception_ptr and status overloads") {
    CHECK(is_device_oom(std::make_exception_ptr(out_of_memory(oom_info{}))));
    CHECK_FALSE(is_device_oom(std::make_exception_ptr(42)));
    CHECK_FALSE(is_device_oom(std::exception_ptr{}));
    CHECK(is_device_oom(status{status_kind::out_of_memory, 2, "cudaErrorMemoryAllocation"}));
    CHECK_FALSE(is_device_oom(status::success()));
}

TEST_CASE("a peer's OOM passed on as text is a device OOM, like oomguard's own") {
    // A step that rewraps exceptions as runtime_error(e.what()) must still leave
    // run() by the OOM path on every rank, or the others wait in the agreement.
    char const* peer = "oomguard: another rank ran out of device memory in this attempt; every rank leaves the step "
                       "and retries together";
    CHECK(is_device_oom(std::runtime_error(peer)));
    CHECK(is_device_oom(std::runtime_error(std::string("step 12: ") + peer)));
    // Pieces of it are not oomguard's message.
    CHECK_FALSE(is_device_oom(std::runtime_error("another rank ran out of device memory")));
    CHECK_FALSE(is_device_oom(std::runtime_error("oomguard: another rank ran out of device memory in this attempt")));
}

TEST_CASE("cudart's own OOM string after \"CUDA error: \", as CUDA_CHECK macros and c10 write it") {
    // c10_cuda_check_implementation: "CUDA error: " + cudaGetErrorString(err), then
    // a help line, the async suffix, or the newline -- each starting with '\n'.
    char const* accepted[] = {
        "CUDA error: out of memory",
        "CUDA error: out of memory\n",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, "
        "so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
        "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n",
        "CUDA error: out of memory\nDevice-side assertions were explicitly omitted for this error check",
    };
    for (std::string t : accepted) {
        CAPTURE(t);
        CHECK(is_device_oom(std::runtime_error(t)));
    }
    char const* refused[] = {
        "CUDA error: out of memory on the host",            // more words: not cudart's string
        "CUDA error: out of memory.",                       // nor a documented separator
        "CUDA error: out of memoryX",
        "CUDA error: out of mem",
        "CUDA error: Out of memory",                        // not cudart's spelling
        "cuda error: out of memory",
        "CUDA error:out of memory",
        "CUDA Error: out of memory",
        "HIP error: out of memory",
        "loader: CUDA error: out of memory",                // not at the start
        " CUDA error: out of memory",
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: ",
        "CUDA error: \nout of memory",
        "out of memory\nCUDA error: out of memory",
    };
    for (std::string t : refused) {
        CAPTURE(t);
        CHECK_FALSE(is_device_oom(std::runtime_error(t)));
    }
}

TEST_CASE("a cuda_error is never an OOM by type, even with a catch-all rule registered") {
    auto everything = register_oom_rule([](std::exception const&) { return true; });
    CHECK(is_device_oom(std::runtime_error("anything")));  // the rule is live
    CHECK_FALSE(is_device_oom(cuda_error(status{status_kind::other, 999, "cudaErrorUnknown"}, "x")));
    CHECK_FALSE(is_device_oom(cuda_error(status{status_kind::sticky, 700, "cudaErrorIllegalAddress"}, "x")));
    CHECK_FALSE(is_device_oom(no_device_error(status{status_kind::no_device, 35, "cudaErrorInsufficientDriver"}, "x")));
    CHECK_FALSE(is_device_oom(std::make_exception_ptr(cuda_error(status{status_kind::sticky, 700, "x"}, "y"))));
    // Nor whatever its text says.
    CHECK_FALSE(is_device_oom(cuda_error(status{status_kind::other, 2, "cudaErrorMemoryAllocation"}, "CUDA error: out of memory")));
}
