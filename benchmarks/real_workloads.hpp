// The seeded training programs of bench_real_steps (whose header comment
// documents each family), shared with bench_policy_sweep's framework rows: a
// workload's shape (Model), the caching allocator family 4 allocates through
// (Reserve), and the program that runs it on a phantom simulated GPU (Run).
#pragma once

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/cache_registry.hpp>
#include <oomguard/detail/random.hpp>
#include <oomguard/device_buffer.hpp>
#include <oomguard/simulated_devices.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

namespace bench {

using namespace oomguard;

using Budget = MemoryBudget<SimulatedDevices>;
using Buffer = DeviceBuffer<SimulatedDevices>;
constexpr std::size_t MiB = std::size_t{1} << 20;

// A hash of the seed, and a uniform [0, 1) from it: the first draw of a SplitMix64.
inline std::uint64_t mix(std::uint64_t x) { return detail::SplitMix64(x).next(); }
inline double unit(std::uint64_t x) { return detail::SplitMix64(x).uniform(); }
inline std::size_t scaled(double x) { return static_cast<std::size_t>(x); }

struct Model {
    std::uint64_t seed;
    std::size_t capacity, others, weights;
    std::vector<std::size_t> act;  // activation bytes per sample, per layer
    std::size_t workspace;         // the largest workspace request
    std::size_t start, best, largest;
    double over = 0;          // how far above the best the global batch starts
    bool framework = false;   // families 3 and 4: a framework's timing
    bool caching = false;     // families 4 and 5: through a caching allocator, with per-position temporaries
    bool allocator_meter = false;  // family 5: measured and released as torch.hpp's TorchCudaMeter/Cache do
    std::size_t tail_extra() const { return framework ? weights / 2 : 0; }
    std::size_t first_extra() const { return caching ? weights / 4 : 0; }
    // Family 4 keeps its weights, gradients and Adam moments per layer, as a framework does per parameter.
    std::size_t layer_weights(std::size_t l) const {
        std::size_t const n = act.size(), share = weights / n;
        return l + 1 == n ? weights - share * (n - 1) : share;
    }

    double nonlinear(std::size_t m) const { return 1.0 + 0.04 * (2.0 * unit(seed * 7919 + m) - 1.0); }
    std::size_t activation(std::size_t layer, std::size_t m) const {
        return scaled(static_cast<double>(act[layer] * m) * nonlinear(m));
    }
    // A cuBLAS-like workspace: a quarter to all of the largest, by layer and size.
    std::size_t workspace_for(std::size_t layer, std::size_t m) const {
        return workspace / 4 * (1 + mix(seed * 131 + layer * 31 + m) % 4);
    }
    std::size_t persistent() const { return 4 * weights; }  // weights, Adam m and v, gradients
    // The step's peak over what is held before it (the peak is at the start of the backward).
    std::size_t step_peak(std::size_t m) const {
        std::size_t held = 0, peak = 0;
        for (std::size_t l = 0; l < act.size(); ++l) {
            held += activation(l, m);
            peak = std::max(peak, held + workspace_for(l, m));
        }
        for (std::size_t l = act.size(); l-- > 0;) {
            peak = std::max(peak, held + activation(l, m) + workspace_for(l, m));
            held -= activation(l, m);
        }
        return peak;
    }
    // Steady state, the optimizer's state included: any micro-batch, the last with its extra.
    bool fits(std::size_t m) const { return others + persistent() + step_peak(m) + tail_extra() <= capacity; }

    // The shape of a workload; families 0-3 with their best and start. Family 4's
    // best depends on the allocator, and make_workload() finds it by running it.
    static Model make(std::uint64_t seed, int family) {
        Model w{};
        w.seed = seed;
        w.framework = family >= 3;
        w.caching = family == 4;
        if (family >= 3) family = 0;
        double gib = static_cast<double>(std::size_t{1} << 30);
        w.capacity = scaled((16 + 64 * unit(seed * 8 + 1)) * gib);
        double other_share = family == 1 ? 0.15 : 0.10;
        w.others = scaled(other_share * unit(seed * 8 + 2) * static_cast<double>(w.capacity));
        w.weights = scaled((0.005 + 0.03 * unit(seed * 8 + 3)) * static_cast<double>(w.capacity));
        std::size_t layers = family == 0   ? 4 + mix(seed * 8 + 4) % 9
                             : family == 1 ? 16 + mix(seed * 8 + 4) % 17
                                           : 2 + mix(seed * 8 + 4) % 3;
        // Room left for the step, shared out so that the best size lands in [16, 2048].
        double room = static_cast<double>(w.capacity - w.others - w.persistent());
        double target = 16.0 * std::pow(128.0, unit(seed * 8 + 5));
        double per_sample = room * 0.85 / target;
        for (std::size_t l = 0; l < layers; ++l)
            w.act.push_back(scaled(per_sample / static_cast<double>(layers) * (0.5 + unit(seed * 97 + l))));
        w.workspace = scaled((family == 0 ? 0.01 : family == 1 ? 0.04 : 0.08) * room * (0.5 + unit(seed * 8 + 6)));
        w.over = family == 2 ? 0.05 + 14.95 * unit(seed * 8 + 7) : 0.2 + 6.8 * unit(seed * 8 + 7);
        if (w.caching) return w;
        // The best plan: the largest m such that every size up to m fits. A plan
        // runs remainders of whatever size G leaves, and the workspace choice
        // can make one size fit where a smaller one does not; a policy that
        // settles above the best on a size that happens to fit scores 1.
        while (w.fits(w.best + 1)) ++w.best;
        // The largest size that fits at all, lucky ones included (the stricter yardstick).
        for (std::size_t m = 2 * w.best + 2; m > w.best && w.largest == 0; --m)
            if (w.fits(m)) w.largest = m;
        if (w.largest == 0) w.largest = w.best;
        w.start = w.best + 1 + scaled(w.over * static_cast<double>(w.best));
        return w;
    }
};

// A caching allocator after PyTorch's CUDACachingAllocator (its defaults): sizes
// rounded up to 512 bytes; up to 1 MiB from 2 MiB segments, larger ones from
// segments of 20 MiB (under 10 MiB) or of the size rounded up to 2 MiB; the
// best-fitting free block of its pool, split when what is left is at least
// 512 bytes (small) or over 1 MiB (large); a freed block merges with its free
// neighbours in the segment. The device sees only segments: they stay reserved
// until release() (empty_cache) frees those with nothing in use, which the
// allocator also does itself when a segment's cudaMalloc fails, before trying
// it once more. So it only grows, in segments, and it fragments.
class Reserve {
public:
    struct Where {
        std::size_t segment = 0, offset = 0;
    };

    Reserve(Budget& budget, SimulatedDevices& gpu) noexcept : budget_(budget), gpu_(gpu) {}
    Reserve(Reserve const&) = delete;
    Reserve& operator=(Reserve const&) = delete;

    // `burst`: another process's burst meets this allocation: every cudaMalloc it makes fails.
    Where allocate(std::size_t bytes, bool burst) {
        std::size_t const size = bytes <= 512 ? 512 : (bytes + 511) / 512 * 512;
        bool const small = size <= MiB;
        auto& pool = free_[small ? 1 : 0];
        std::size_t have = 0, seg = 0, off = 0;
        auto it = pool.lower_bound(Key{size, 0, 0});
        if (it != pool.end()) {
            std::tie(have, seg, off) = *it;
            pool.erase(it);
        } else {
            have = small ? 2 * MiB : size < 10 * MiB ? 20 * MiB : (size + 2 * MiB - 1) / (2 * MiB) * (2 * MiB);
            seg = grow(have, small, burst);
        }
        Segment& s = segments_[seg];
        std::size_t const rest = have - size;
        if (small ? rest >= 512 : rest > MiB) {
            s.blocks[off] = {size, false};
            s.blocks[off + size] = {rest, true};
            pool.insert(Key{rest, seg, off + size});
        } else {
            s.blocks[off] = {have, false};
        }
        ++s.live;
        allocated_ += s.blocks[off].first;
        peak_ = std::max(peak_, allocated_);
        return Where{seg, off};
    }

    void free(Where w) noexcept {
        Segment& s = segments_[w.segment];
        auto& pool = free_[s.small ? 1 : 0];
        auto it = s.blocks.find(w.offset);
        std::size_t off = it->first, size = it->second.first;
        allocated_ -= size;
        auto next = std::next(it);
        if (next != s.blocks.end() && next->second.second) {
            pool.erase(Key{next->second.first, w.segment, next->first});
            size += next->second.first;
            s.blocks.erase(next);
        }
        if (it != s.blocks.begin()) {
            auto prev = std::prev(it);
            if (prev->second.second) {
                pool.erase(Key{prev->second.first, w.segment, prev->first});
                off = prev->first;
                size += prev->second.first;
                s.blocks.erase(it);
                it = prev;
            }
        }
        it->second = {size, true};
        pool.insert(Key{size, w.segment, off});
        --s.live;
    }

    // The cache's side, for CacheRegistry: the segments with nothing in use.
    std::size_t releasable_bytes() const noexcept {
        std::size_t n = 0;
        for (auto const& s : segments_)
            if (s.memory && s.live == 0) n += s.size;
        return n;
    }
    std::size_t release() {
        std::size_t freed = 0;
        for (std::size_t i = 0; i < segments_.size(); ++i) {
            Segment& s = segments_[i];
            if (!s.memory || s.live != 0) continue;
            free_[s.small ? 1 : 0].erase(Key{s.size, i, 0});
            s.memory.reset();
            s.blocks.clear();
            freed += s.size;
            unused_.push_back(i);
        }
        return freed;
    }

    std::size_t segments_made() const noexcept { return made_; }  // cudaMallocs that succeeded
    // The allocator's statistics, as libtorch's getDeviceStats gives them (family 5's meter).
    std::size_t allocated() const noexcept { return allocated_; }
    std::size_t reserved() const noexcept { return budget_.used(); }
    std::size_t allocated_peak() const noexcept { return peak_; }
    void reset_allocated_peak() noexcept { peak_ = allocated_; }

private:
    using Key = std::tuple<std::size_t, std::size_t, std::size_t>;  // size, segment, offset
    struct Segment {
        std::unique_ptr<Buffer> memory;  // null once released
        std::size_t size = 0, live = 0;  // live: blocks in use
        bool small = false;
        std::map<std::size_t, std::pair<std::size_t, bool>> blocks;  // offset -> size, free
    };

    std::size_t grow(std::size_t size, bool small, bool burst) {
        auto device_malloc = [&] {
            struct Calm {  // the burst, if any, ends with this call
                SimulatedDevices& gpu;
                bool on;
                ~Calm() {
                    if (on) gpu.clear_faults(0);
                }
            } calm{gpu_, burst};
            if (burst) gpu_.fail_next(0, 1);
            return std::make_unique<Buffer>(budget_, size);
        };
        std::unique_ptr<Buffer> memory;
        try {
            memory = device_malloc();
        } catch (out_of_memory const&) {
            release();
            memory = device_malloc();
        }
        std::size_t i = segments_.size();
        if (!unused_.empty()) {
            i = unused_.back();
            unused_.pop_back();
        } else {
            segments_.emplace_back();
        }
        Segment& s = segments_[i];
        s.memory = std::move(memory);
        s.size = size;
        s.small = small;
        s.live = 0;
        s.blocks[0] = {size, true};
        ++made_;
        return i;
    }

    Budget& budget_;
    SimulatedDevices& gpu_;
    std::vector<Segment> segments_;
    std::vector<std::size_t> unused_;  // released segments' slots
    std::set<Key> free_[2];            // free blocks of the large [0] and small [1] pools
    std::size_t made_ = 0;
    std::size_t allocated_ = 0, peak_ = 0;  // bytes in blocks in use (rounded), now and at the peak
};

// Family 5's meter: the allocator's bytes in use and their peak, and available =
// the device's free memory plus what the reserve holds unused -- what
// torch.hpp's TorchCudaMeter reads from libtorch's allocator.
class AllocatorMeter {
public:
    AllocatorMeter(Reserve& r, SimulatedDevices& gpu) noexcept : reserve_(r), gpu_(gpu) {}
    int device() const noexcept { return 0; }
    std::size_t used() const noexcept { return reserve_.allocated(); }
    std::size_t peak() const noexcept { return std::max(reserve_.allocated_peak(), raised_); }
    std::size_t reset_peak() noexcept {
        std::size_t const old = peak();
        reserve_.reset_allocated_peak();
        raised_ = 0;
        return old;
    }
    void raise_peak(std::size_t v) noexcept { raised_ = std::max(raised_, v); }
    static constexpr bool counts_cached() noexcept { return false; }  // bytes in use: not the reserve
    std::size_t available() const noexcept {
        std::size_t free = 0, total = 0;
        if (!gpu_.memory_info(0, &free, &total).ok()) return 0;
        return free + (reserve_.reserved() - reserve_.allocated());
    }

private:
    Reserve& reserve_;
    SimulatedDevices& gpu_;
    std::size_t raised_ = 0;
};

// One allocation of the program: a buffer of its own (families 0-3) or a block of the reserve (family 4).
class Mem {
public:
    Mem() noexcept = default;
    explicit Mem(Buffer b) noexcept : buffer_(std::move(b)) {}
    Mem(Reserve& r, Reserve::Where w) noexcept : reserve_(&r), where_(w) {}
    Mem(Mem&& o) noexcept : buffer_(std::move(o.buffer_)), reserve_(o.reserve_), where_(o.where_) {
        o.reserve_ = nullptr;
    }
    Mem& operator=(Mem&& o) noexcept {
        if (this != &o) {
            reset();
            buffer_ = std::move(o.buffer_);
            reserve_ = o.reserve_;
            where_ = o.where_;
            o.reserve_ = nullptr;
        }
        return *this;
    }
    Mem(Mem const&) = delete;
    Mem& operator=(Mem const&) = delete;
    ~Mem() { reset(); }
    void reset() noexcept {
        if (reserve_ != nullptr) reserve_->free(where_);
        reserve_ = nullptr;
        buffer_ = Buffer();
    }
    explicit operator bool() const noexcept { return reserve_ != nullptr || buffer_.data() != nullptr; }

private:
    Buffer buffer_;
    Reserve* reserve_ = nullptr;
    Reserve::Where where_;
};

// The training program: persistent state first, then global batches under adaptive_batch.
struct Run {
    Model const& w;
    SimulatedDevices gpu;
    Budget budget;
    Reserve reserve;
    AllocatorMeter allocator_meter;
    CacheRegistry caches;        // this program's own: the reserve's free segments (family 4)
    CacheRegistration reserve_registered;
    std::vector<Mem> weights, adam, grads;  // families 0-3: one buffer each; family 4: per layer
    double fault_rate;
    std::uint64_t draws = 0;

    Run(Model const& model, double faults)
        : w(model), gpu({{model.capacity}}, SimulatedMemory::phantom, false), budget(gpu, 0, Limit::unlimited()),
          reserve(budget, gpu), allocator_meter(reserve, gpu), fault_rate(faults) {
        gpu.set_used_by_others(0, w.others);
        if (w.allocator_meter) {
            // TorchCudaCache's pair: releasable is reserved - allocated, release() is empty_cache.
            reserve_registered = caches.add(
                "caching allocator", 0, [this] { return reserve.reserved() - reserve.allocated(); },
                [this] { return reserve.release(); });
        } else if (w.caching) {
            reserve_registered = caches.add("caching allocator's free segments", 0, reserve);
        }
        if (w.caching) {
            for (std::size_t l = 0; l < w.act.size(); ++l) weights.push_back(alloc(w.layer_weights(l)));
        } else {
            weights.push_back(alloc(w.weights));
            if (!w.framework) adam.push_back(alloc(2 * w.weights));
        }
        grads.resize(w.caching ? w.act.size() : 1);
    }
    Mem alloc(std::size_t bytes, bool burst = false) {
        if (w.caching) return Mem(reserve, reserve.allocate(bytes, burst));
        if (burst) gpu.fail_next(0, 1);
        return Mem(Buffer(budget, bytes));
    }
    // The optimizer's step: Adam's moments on the first; a framework's zero_grad frees the gradients.
    void commit() {
        if (adam.empty()) {
            if (w.caching) {
                for (std::size_t l = 0; l < w.act.size(); ++l) {
                    adam.push_back(alloc(w.layer_weights(l)));
                    adam.push_back(alloc(w.layer_weights(l)));
                }
            } else {
                adam.push_back(alloc(2 * w.weights));
            }
        }
        if (w.framework) rollback();
    }
    void rollback() {
        if (w.framework)
            for (auto& g : grads) g.reset();
    }
    void step(MicroBatch const& mb, std::size_t G) {
        if (!w.caching && !grads[0]) grads[0] = alloc(w.weights);  // the first backward's .grad
        std::size_t burst = w.act.size();  // the layer whose activation meets a burst (none)
        if (fault_rate > 0 && unit(w.seed * 1000003 + ++draws) < fault_rate)
            burst = static_cast<std::size_t>(mix(w.seed * 999983 + draws) % w.act.size());
        Mem first;  // family 4: the first micro-batch's lazily built buffer, through its backward
        if (w.first_extra() != 0 && mb.offset == 0) first = alloc(w.first_extra());
        std::vector<Mem> acts;
        acts.reserve(w.act.size());
        for (std::size_t l = 0; l < w.act.size(); ++l) {
            acts.push_back(alloc(w.activation(l, mb.size), l == burst));
            Mem ws = alloc(w.workspace_for(l, mb.size));
        }
        Mem norm;  // the last micro-batch's gradient norm, through its backward
        if (w.tail_extra() != 0 && mb.offset + mb.size == G) norm = alloc(w.tail_extra());
        for (std::size_t l = w.act.size(); l-- > 0;) {
            Mem grad_act = alloc(w.activation(l, mb.size));
            if (w.caching && !grads[l]) grads[l] = alloc(w.layer_weights(l));  // this layer's .grad
            Mem ws = alloc(w.workspace_for(l, mb.size));
            acts.pop_back();
        }
    }
};

// Family 4: whether global batches of micro-batches of m samples run, from a
// fresh program, in its steady state: the first micro-batch, middle ones until
// one makes no new segment, the last (the allocator's state repeats from then
// on); global batches so until one, after the first commit, makes none.
inline bool runs(Model const& w, std::size_t m) {
    Run run(w, 0.0);
    std::size_t const far = std::size_t{1} << 40;  // a global batch the first and middle ones do not end
    auto step_at = [&](std::size_t offset, std::size_t G) {
        MicroBatch mb;
        mb.offset = offset;
        mb.size = m;
        run.step(mb, G);
    };
    try {
        for (int batch = 0; batch < 4; ++batch) {
            std::size_t const before = run.reserve.segments_made();
            step_at(0, far);
            for (std::size_t k = 1; k <= 4; ++k) {
                std::size_t const made = run.reserve.segments_made();
                step_at(k * m, far);
                if (run.reserve.segments_made() == made) break;
            }
            step_at(9 * m, 10 * m);
            run.commit();
            if (batch > 0 && run.reserve.segments_made() == before) break;
        }
    } catch (out_of_memory const&) {
        return false;
    }
    return true;
}

// A workload of `family`, its best plan and start included.
inline Model make_workload(std::uint64_t seed, int family) {
    Model w = Model::make(seed, family);
    if (!w.caching) return w;
    while (runs(w, w.best + 1)) ++w.best;
    for (std::size_t m = 2 * w.best + 2; m > w.best && w.largest == 0; --m)
        if (runs(w, m)) w.largest = m;
    if (w.largest == 0) w.largest = w.best;
    w.start = w.best + 1 + scaled(w.over * static_cast<double>(w.best));
    return w;
}

// Workload `i` (from 0) of `family`, made once per process (family 4's best is found by running it).
inline Model const& workload(int i, int family) {
    static std::map<std::pair<int, int>, Model> made;
    auto it = made.find({family, i});
    if (it == made.end() && family == 5) {  // family 4's workloads, measured by the allocator
        Model w = workload(i, 4);
        w.allocator_meter = true;
        it = made.emplace(std::make_pair(family, i), w).first;
    }
    if (it == made.end()) {
        int const seeds = family == 4 ? 3 : family;  // family 4: family 3's workloads, through the allocator
        auto seed = static_cast<std::uint64_t>(i) + 1 + static_cast<std::uint64_t>(seeds) * 100003;
        it = made.emplace(std::make_pair(family, i), make_workload(seed, family)).first;
    }
    return it->second;
}

}  // namespace bench
