# The libtorch example's model and data (examples/torch_train_loop.cpp) in
# PyTorch, recovered by accelerate's find_executable_batch_size under the same
# caching-allocator cap: time to recover, failed attempts, final batch size.
# Prints one line for gpu-check; skips (exit 0) where torch, accelerate or a GPU is missing.
import sys, time

def main():
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    bs = int(args.get("--bs", 4096)); cap = int(args.get("--cap-mib", 96)) << 20
    samples = int(args.get("--samples", 4096)); hidden = int(args.get("--hidden", 128))
    try:
        import torch
        from accelerate.utils import find_executable_batch_size
    except Exception as e:
        print(f"torch_mlp_find_batch: skipped ({e.__class__.__name__}: {e})")
        return 0
    if not torch.cuda.is_available():
        print("torch_mlp_find_batch: skipped (no GPU visible to torch)")
        return 0
    torch.manual_seed(1)
    torch.empty(1, device="cuda")  # initialise the allocator, then cap it as the C++ example does
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.mem_get_info()[1], 0)
    X = torch.randn(samples, 32).cuda(); w = torch.randn(32, 1).cuda()
    Y = torch.sin(X @ w / 4) + 0.01 * torch.randn(samples, 1).cuda()
    model = torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    attempts = []
    t0 = time.perf_counter()

    @find_executable_batch_size(starting_batch_size=bs)
    def epoch(batch_size):
        attempts.append(batch_size)
        for first in range(0, samples - batch_size + 1, batch_size):
            loss = torch.nn.functional.mse_loss(model(X[first:first + batch_size]), Y[first:first + batch_size])
            loss.backward(); opt.step(); opt.zero_grad()
        torch.cuda.synchronize()
        return batch_size

    final = epoch()
    print(f"torch_mlp_find_batch: {len(attempts) - 1} failed attempts, final batch {final} "
          f"(a different optimizer step size than --bs {bs}), {time.perf_counter() - t0:.2f} s")
    return 0

sys.exit(main())
