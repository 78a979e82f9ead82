// The libtorch examples' model and data, shared by torch_train_loop.cpp (one
// process) and torch_ddp.cpp (c10d ranks), so that the data-parallel run can be
// held to the single-process one: the same data and initial weights from the
// same seed, the same network, the same precision ladder.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <cstdint>

namespace torch_example {

/// The MLP: inputs -> hidden -> hidden -> 1, tanh between.
struct NetImpl : torch::nn::Module {
    torch::nn::Linear fc1{nullptr}, fc2{nullptr}, out{nullptr};
    NetImpl(int inputs, int hidden)
        : fc1(register_module("fc1", torch::nn::Linear(inputs, hidden))),
          fc2(register_module("fc2", torch::nn::Linear(hidden, hidden))),
          out(register_module("out", torch::nn::Linear(hidden, 1))) {}
    torch::Tensor forward(torch::Tensor x) {
        x = torch::tanh(fc1->forward(x));
        x = torch::tanh(fc2->forward(x));
        return out->forward(x);
    }
};
TORCH_MODULE(Net);

/// bf16 autocast on `device` for a scope (the precision ladder's second rung).
class Autocast {
public:
    Autocast(c10::DeviceType device, bool on)
        : device_(device), was_(at::autocast::is_autocast_enabled(device)),
          dtype_(at::autocast::get_autocast_dtype(device)) {
        if (on) {
            at::autocast::set_autocast_dtype(device, at::kBFloat16);
            at::autocast::set_autocast_enabled(device, true);
        }
    }
    Autocast(Autocast const&) = delete;
    Autocast& operator=(Autocast const&) = delete;
    ~Autocast() {
        at::autocast::set_autocast_enabled(device_, was_);
        at::autocast::set_autocast_dtype(device_, dtype_);
        at::autocast::clear_cache();
    }

private:
    c10::DeviceType device_;
    bool was_;
    at::ScalarType dtype_;
};

constexpr int inputs = 32;

/// Synthetic regression data, held on the device like a dataset that fits:
/// X (samples x inputs), Y = sin(X w / 4) + noise. Draws from libtorch's
/// generator, so call it right after torch::manual_seed and before the model.
/// Holds w too, as the examples always have: what a run holds on its budget
/// decides where it runs out of memory.
struct Data {
    torch::Tensor X, w, Y;
    Data(std::int64_t samples, torch::Device device)
        : X(torch::randn({samples, inputs}).to(device)), w(torch::randn({inputs, 1}).to(device)),
          Y(torch::sin(X.matmul(w) / 4) + 0.01 * torch::randn({samples, 1}).to(device)) {}
};

}  // namespace torch_example
