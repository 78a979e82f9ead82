// DeviceBuffer: an owning handle to device memory allocated through a budget.
#pragma once

#include <oomguard/memory_budget.hpp>

#include <cstddef>
#include <limits>
#include <type_traits>

namespace oomguard {

/// Owns `size()` bytes allocated through a MemoryBudget and frees them on
/// destruction. Move-only, like std::unique_ptr.
template <class Backend = default_backend>
class DeviceBuffer {
public:
    DeviceBuffer() noexcept = default;

    /// Allocates `bytes` through `budget`; throws out_of_memory when it does not fit.
    DeviceBuffer(MemoryBudget<Backend>& budget, std::size_t bytes)
        : budget_(&budget), data_(budget.allocate(bytes)), size_(bytes) {}

    /// A budget of another backend: a compile error that says what to write.
    template <class Other, std::enable_if_t<!std::is_same<Other, Backend>::value, int> = 0>
    DeviceBuffer(MemoryBudget<Other>&, std::size_t) {
        static_assert(std::is_same<Other, Backend>::value,
                      "oomguard: a DeviceBuffer<Backend> allocates through a MemoryBudget<Backend> of the same "
                      "backend; this budget's backend differs (DeviceBuffer<> is DeviceBuffer<default_backend>, "
                      "the GPU when CUDA is found). Write DeviceBuffer<oomguard::SimulatedDevices> for a simulated "
                      "budget, or let C++17 deduce it: oomguard::DeviceBuffer buf(budget, bytes);");
    }

    /// Takes over `o`'s memory; `o` is left empty.
    DeviceBuffer(DeviceBuffer&& o) noexcept : budget_(o.budget_), data_(o.data_), size_(o.size_) {
        o.data_ = nullptr;
        o.size_ = 0;
    }
    /// Frees what this buffer held, then takes over `o`'s memory.
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
        if (this != &o) {
            reset();
            budget_ = o.budget_;
            data_ = o.data_;
            size_ = o.size_;
            o.data_ = nullptr;
            o.size_ = 0;
        }
        return *this;
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
    ~DeviceBuffer() { reset(); }

    /// The device memory (null when empty).
    void* data() const noexcept { return data_; }
    /// Bytes allocated (as asked, before any rounding).
    std::size_t size() const noexcept { return size_; }
    /// True when the buffer holds no memory.
    bool empty() const noexcept { return size_ == 0; }
    /// The budget the memory came from (null for a default-constructed buffer).
    MemoryBudget<Backend>* budget() const noexcept { return budget_; }

    /// The memory as an array of T; throws std::invalid_argument when the size
    /// is not a whole number of T.
    template <class T>
    T* as() const {
        if (size_ % sizeof(T) != 0)
            detail::throw_invalid(detail::Message() << "oomguard: DeviceBuffer::as: " << size_
                                                    << " bytes is not a multiple of sizeof(T) = "
                                                    << sizeof(T));
        return static_cast<T*>(data_);
    }

    /// Frees now.
    void reset() noexcept {
        if (budget_ != nullptr && data_ != nullptr) budget_->deallocate(data_, size_);
        data_ = nullptr;
        size_ = 0;
    }

private:
    MemoryBudget<Backend>* budget_ = nullptr;
    void* data_ = nullptr;
    std::size_t size_ = 0;
};

/// A buffer of `count` elements of T; throws std::length_error if the byte size overflows.
template <class T, class Backend>
DeviceBuffer<Backend> make_device_buffer(MemoryBudget<Backend>& budget, std::size_t count) {
    if (count > std::numeric_limits<std::size_t>::max() / sizeof(T))
        detail::throw_length(detail::Message() << "oomguard: make_device_buffer: " << count << " elements of "
                                               << sizeof(T) << " bytes overflow size_t");
    return DeviceBuffer<Backend>(budget, count * sizeof(T));
}

/// DeviceBuffer buf(budget, bytes) takes the budget's backend.
template <class Backend>
DeviceBuffer(MemoryBudget<Backend>&, std::size_t) -> DeviceBuffer<Backend>;

/// DeviceBuffer's stream-ordered twin: allocated on a stream through
/// MemoryBudget::allocate_async and freed on the same stream (or the one given
/// to reset) when it goes, so the free is ordered after the work that used it.
/// Move-only. `StreamBuffer buf(budget, bytes, stream)` deduces the backend.
template <class Backend>
class StreamBuffer {
public:
    static_assert(is_stream_ordered_v<Backend>, "oomguard: StreamBuffer needs a stream-ordered backend "
                                                "(CudaRuntime or SimulatedDevices; see backend.hpp)");
    /// The backend's stream (cudaStream_t for CudaRuntime).
    using stream_type = typename Backend::stream_type;

    StreamBuffer() noexcept = default;
    /// Allocates `bytes` through `budget` from the stream-ordered pool, ordered on `stream`;
    /// throws out_of_memory when it does not fit (cuda_error for any other failure).
    StreamBuffer(MemoryBudget<Backend>& budget, std::size_t bytes, stream_type stream)
        : budget_(&budget), data_(budget.allocate_async(bytes, stream)), size_(bytes), stream_(stream) {}
    /// Takes over `o`'s memory and stream; `o` is left empty.
    StreamBuffer(StreamBuffer&& o) noexcept : budget_(o.budget_), data_(o.data_), size_(o.size_), stream_(o.stream_) {
        o.data_ = nullptr;
        o.size_ = 0;
    }
    /// Frees what this buffer held (on its stream), then takes over `o`'s memory.
    StreamBuffer& operator=(StreamBuffer&& o) noexcept {
        if (this != &o) {
            reset();
            budget_ = o.budget_;
            data_ = o.data_;
            size_ = o.size_;
            stream_ = o.stream_;
            o.data_ = nullptr;
            o.size_ = 0;
        }
        return *this;
    }
    StreamBuffer(StreamBuffer const&) = delete;
    StreamBuffer& operator=(StreamBuffer const&) = delete;
    ~StreamBuffer() { reset(); }

    /// The device memory (null when empty); use it on stream() or after synchronizing.
    void* data() const noexcept { return data_; }
    /// Bytes allocated (as asked; the budget counts them rounded as the pool takes them).
    std::size_t size() const noexcept { return size_; }
    /// The stream the memory is ordered on; it is freed on this stream too.
    stream_type stream() const noexcept { return stream_; }

    /// Frees now, ordered on the buffer's stream.
    void reset() noexcept { reset(stream_); }
    /// Frees now, ordered on `stream` (work on the buffer's own stream must be
    /// ordered before it, by an event or a synchronization).
    void reset(stream_type stream) noexcept {
        if (budget_ != nullptr && data_ != nullptr) budget_->deallocate_async(data_, size_, stream);
        data_ = nullptr;
        size_ = 0;
    }

private:
    MemoryBudget<Backend>* budget_ = nullptr;
    void* data_ = nullptr;
    std::size_t size_ = 0;
    stream_type stream_{};
};

/// Deduces StreamBuffer's backend from its budget: `StreamBuffer buf(budget, bytes, stream)`.
template <class Backend, class Stream>
StreamBuffer(MemoryBudget<Backend>&, std::size_t, Stream) -> StreamBuffer<Backend>;

}  // namespace oomguard
