# The same synthetic workload as gpu_oom_check, recovered by PyTorch with
# accelerate's find_executable_batch_size: a hog leaves --leave-mib free, the
# step needs 16 MiB per sample of a batch of 256. Prints one line for gpu-check.
import sys, time

def main():
    leave = 1024
    if "--leave-mib" in sys.argv:
        leave = int(sys.argv[sys.argv.index("--leave-mib") + 1])
    try:
        import torch
        from accelerate.utils import find_executable_batch_size
    except Exception as e:  # not installed: say so, do not fail the check
        print(f"torch_find_batch: skipped ({e.__class__.__name__}: {e})")
        return 0
    if not torch.cuda.is_available():
        print("torch_find_batch: skipped (no GPU visible to torch)")
        return 0
    free, total = torch.cuda.mem_get_info()
    hog = []
    while free > (leave << 20) + (1 << 30):
        hog.append(torch.empty(1 << 30, dtype=torch.uint8, device="cuda"))
        free, total = torch.cuda.mem_get_info()
    attempts = []

    @find_executable_batch_size(starting_batch_size=256)
    def step(batch_size):
        attempts.append(batch_size)
        act = torch.zeros(batch_size * (16 << 20), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        del act
        return batch_size

    t0 = time.perf_counter()
    final = step()
    ms = (time.perf_counter() - t0) * 1e3
    print(f"torch_find_batch: free {free / 2**30:.2f} GiB; final batch {final}; attempts {attempts}; "
          f"failed attempts after the first {max(len(attempts) - 2, 0)}; time to recover {ms:.1f} ms")
    return 0

sys.exit(main())
