// The example's model: a one-hidden-layer MLP (D inputs, H tanh units, one
// output) trained by SGD on a squared error, written once with Thrust. Every
// device buffer goes through a MemoryBudget. Used by train_loop.cpp and by the
// fault-soak test.
#pragma once

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/thrust.hpp>

#include <thrust/fill.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/transform.h>
#include <thrust/transform_reduce.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#define MLP_HD __host__ __device__
#else
#define MLP_HD
#endif

namespace mlp {

// bf16 storage: the upper half of an IEEE float, rounded to nearest even.
MLP_HD inline std::uint16_t to_bf16(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>(u >> 16);
}
MLP_HD inline float from_bf16(std::uint16_t h) {
    std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// hidden[s*H + h] = tanh(b1[h] + W1[h] . x[s]), stored at fp32 or bf16.
struct Forward {
    float const* X;
    float const* p;
    float* h32;
    std::uint16_t* h16;
    std::size_t first;
    int D, H;
    MLP_HD void operator()(std::size_t k) const {
        std::size_t s = k / static_cast<std::size_t>(H);
        int h = static_cast<int>(k % static_cast<std::size_t>(H));
        float acc = p[H * D + h];
        for (int d = 0; d < D; ++d) acc += p[h * D + d] * X[(first + s) * static_cast<std::size_t>(D) + d];
        float v = tanhf(acc);
        if (h32 != nullptr)
            h32[k] = v;
        else
            h16[k] = to_bf16(v);
    }
};

struct Hidden {
    float const* h32;
    std::uint16_t const* h16;
    MLP_HD float operator()(std::size_t k) const { return h32 != nullptr ? h32[k] : from_bf16(h16[k]); }
};

// err[s] = prediction - target.
struct Error {
    Hidden hid;
    float const* p;
    float const* y;
    std::size_t first;
    int D, H;
    MLP_HD float operator()(std::size_t s) const {
        float out = p[H * D + 2 * H];
        for (int h = 0; h < H; ++h) out += p[H * D + H + h] * hid(s * static_cast<std::size_t>(H) + h);
        return out - y[first + s];
    }
};

struct Square {
    MLP_HD float operator()(float e) const { return e * e; }
};

// grad[j] += scale * d(sum of squared errors)/d(param j) over the micro-batch.
struct Gradient {
    Hidden hid;
    float const* X;
    float const* err;
    float const* p;
    float* grad;
    std::size_t first, size;
    int D, H;
    float scale;
    MLP_HD void operator()(int j) const {
        float g = 0;
        if (j < H * D + H) {  // W1[h, d] or b1[h]
            int h = j < H * D ? j / D : j - H * D;
            int d = j < H * D ? j % D : -1;
            float w2 = p[H * D + H + h];
            for (std::size_t s = 0; s < size; ++s) {
                float a = hid(s * static_cast<std::size_t>(H) + h);
                float back = err[s] * w2 * (1.0f - a * a);
                g += d >= 0 ? back * X[(first + s) * static_cast<std::size_t>(D) + d] : back;
            }
        } else if (j < H * D + 2 * H) {  // W2[h]
            int h = j - H * D - H;
            for (std::size_t s = 0; s < size; ++s) g += err[s] * hid(s * static_cast<std::size_t>(H) + h);
        } else {  // b2
            for (std::size_t s = 0; s < size; ++s) g += err[s];
        }
        grad[j] += scale * g;
    }
};

struct SgdUpdate {
    float lr;
    MLP_HD float operator()(float w, float g) const { return w - lr * g; }
};

/// Synthetic regression data and initial parameters, from a seed.
struct Data {
    int D, H;
    std::vector<float> x, y, params;
    Data(std::size_t samples, int inputs, int hidden, std::uint64_t seed) : D(inputs), H(hidden) {
        x.resize(samples * static_cast<std::size_t>(D));
        y.resize(samples);
        params.resize(static_cast<std::size_t>(H * D + 2 * H + 1));
        std::uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
        auto rnd = [&] {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            return static_cast<float>((s >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
        };
        std::vector<float> truth(static_cast<std::size_t>(D));
        for (float& t : truth) t = rnd();
        for (std::size_t i = 0; i < samples; ++i) {
            float dot = 0;
            for (int d = 0; d < D; ++d) {
                x[i * static_cast<std::size_t>(D) + d] = rnd();
                dot += truth[static_cast<std::size_t>(d)] * x[i * static_cast<std::size_t>(D) + d];
            }
            y[i] = std::sin(dot) + 0.01f * rnd();
        }
        for (float& p : params) p = 0.3f * rnd();
    }
};

/// The model on a device: data, parameters and the gradient accumulator held
/// through `budget`; each step's activations and Thrust's temporaries too.
template <class Backend>
class Model {
public:
    using Budget = oomguard::MemoryBudget<Backend>;
    template <class T>
    using dvec = oomguard::thrust_vector<T, Backend>;

    Model(Budget& budget, Data const& data)
        : budget_(&budget), D_(data.D), H_(data.H), falloc_(budget),
          X_(data.x.begin(), data.x.end(), falloc_), Y_(data.y.begin(), data.y.end(), falloc_),
          params_(data.params.begin(), data.params.end(), falloc_), grad_(data.params.size(), 0.0f, falloc_) {}

    int parameters() const { return H_ * D_ + 2 * H_ + 1; }

    /// One micro-batch of the samples starting at `first`: forward and (when
    /// training) the weighted gradient, added only after every allocation has
    /// succeeded -- so a micro-batch that runs out of memory leaves nothing of
    /// itself, and adaptive_batch may resume after it. Returns its summed squared error.
    double step(std::size_t first, oomguard::MicroBatch const& mb, bool train) {
        auto policy = oomguard::thrust_policy(*budget_);
        std::size_t n = mb.size, cells = n * static_cast<std::size_t>(H_);
        bool full = mb.precision == oomguard::Precision::fp32;
        // fp32 activations reuse the workspace when it is large enough (as a caching
        // allocator reuses its blocks); a larger one is allocated while it is still held.
        bool reuse = full && workspace_.size() >= cells;
        dvec<float> h32(full && !reuse ? cells : 0, falloc_);
        dvec<std::uint16_t> h16(full ? 0 : cells, oomguard::ThrustAllocator<std::uint16_t, Backend>(*budget_));
        dvec<float> err(n, falloc_);
        float* h32p = reuse ? thrust::raw_pointer_cast(workspace_.data())
                            : h32.empty() ? nullptr : thrust::raw_pointer_cast(h32.data());
        std::uint16_t* h16p = h16.empty() ? nullptr : thrust::raw_pointer_cast(h16.data());
        float const* pp = thrust::raw_pointer_cast(params_.data());
        float const* Xp = thrust::raw_pointer_cast(X_.data());
        thrust::for_each(policy, thrust::counting_iterator<std::size_t>(0), thrust::counting_iterator<std::size_t>(cells),
                         Forward{Xp, pp, h32p, h16p, first + mb.offset, D_, H_});
        Hidden hid{h32p, h16p};
        thrust::transform(policy, thrust::counting_iterator<std::size_t>(0), thrust::counting_iterator<std::size_t>(n),
                          err.begin(), Error{hid, pp, thrust::raw_pointer_cast(Y_.data()), first + mb.offset, D_, H_});
        double loss = static_cast<double>(
            thrust::transform_reduce(policy, err.begin(), err.end(), Square{}, 0.0f, thrust::plus<float>()));
        if (train)
            thrust::for_each(policy, thrust::counting_iterator<int>(0), thrust::counting_iterator<int>(parameters()),
                             Gradient{hid, Xp, thrust::raw_pointer_cast(err.data()), pp,
                                      thrust::raw_pointer_cast(grad_.data()), first + mb.offset, n, D_, H_,
                                      2.0f * static_cast<float>(mb.weight) / static_cast<float>(n)});
        if (full && !reuse && keep_workspace_) workspace_.swap(h32);  // the old one is freed with h32
        return loss;
    }

    /// The activation workspace kept between steps: a cache that a CacheRegistry
    /// may empty (its bytes, and release() returning what it freed).
    std::size_t workspace_bytes() const { return workspace_.size() * sizeof(float); }
    std::size_t release_workspace() {
        std::size_t bytes = workspace_bytes();
        dvec<float>(falloc_).swap(workspace_);
        return bytes;
    }
    /// Whether step() keeps its fp32 activations as the workspace (the default).
    void keep_workspace(bool on) {
        keep_workspace_ = on;
        if (!on) release_workspace();
    }

    /// The optimizer step and zero_grad.
    void commit(float lr) {
        thrust::transform(oomguard::thrust_policy(*budget_), params_.begin(), params_.end(), grad_.begin(),
                          params_.begin(), SgdUpdate{lr});
        thrust::fill(grad_.begin(), grad_.end(), 0.0f);
    }
    /// zero_grad for an abandoned global batch.
    void rollback() { thrust::fill(grad_.begin(), grad_.end(), 0.0f); }

    std::vector<float> weights() const {
        std::vector<float> w(params_.size());
        thrust::copy(params_.begin(), params_.end(), w.begin());
        return w;
    }

private:
    Budget* budget_;
    int D_, H_;
    oomguard::ThrustAllocator<float, Backend> falloc_;
    dvec<float> X_, Y_, params_, grad_, workspace_{falloc_};
    bool keep_workspace_ = true;
};

}  // namespace mlp
