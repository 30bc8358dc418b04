# GPU: new alignment checked like tests/test_kernels.py::test_align_routing on Zipf routing, and timed
# (CUDA-graph replay) against the old module (.ab/old) at the benchmark shapes.
import sys, importlib.util, torch, triton.testing
sys.path.insert(0, ".")
from benchmarks import kernel_check as kc
from vllm_mxmoe.kernels import align as new
spec = importlib.util.spec_from_file_location("align_old", ".ab/old/vllm_mxmoe/kernels/align.py")
old = importlib.util.module_from_spec(spec); sys.modules["align_old"] = old; spec.loader.exec_module(old)

def check(r, ids, n_local, block_m):
    flat = ids.reshape(-1).long(); num_slots = flat.numel()
    counts = torch.bincount(flat, minlength=n_local)
    blocks = (counts + block_m - 1) // block_m
    nb = int(r.num_blocks.item())
    assert nb == int(blocks.sum()), (nb, int(blocks.sum()))
    assert torch.equal(r.slot_expert.long(), flat)
    assert torch.equal(r.block_expert[:nb].long(), torch.repeat_interleave(torch.arange(n_local, device=ids.device), blocks))
    rows = r.sorted_ids[: nb * block_m].long()
    real = rows[rows < num_slots]
    assert torch.equal(real.sort().values, torch.arange(num_slots, device=ids.device))
    assert torch.all(rows[rows >= num_slots] == num_slots)
    owner = r.block_expert[:nb].long().repeat_interleave(block_m)
    assert torch.equal(owner[rows < num_slots], flat[real])
    assert torch.all(r.block_expert[nb:] == -1)

for shape in kc.LAYER_SHAPES:
    s = kc.SHAPES[shape]
    for t in (1, 4, 16, 64, 256, 512, 1024, 4096, 8192):
        ids, _ = kc.zipf_routing(t, s["experts"], s["topk"], seed=t + 11)
        bm = 16 if t * s["topk"] / s["experts"] <= 48 else (64 if t * s["topk"] / s["experts"] <= 128 else 128)
        res = []
        for name, mod, one in (("old", old, None), ("new", new, None), ("new3", new, False)):
            if name == "new3" and new.uses_one_program(ids.numel(), s["experts"], bm) is False:
                continue
            for _ in range(3):
                r = mod.align_routing(ids, s["experts"], bm, one_program=one)
            if name != "old":
                check(r, ids, s["experts"], bm)
            us = triton.testing.do_bench_cudagraph(lambda: mod.align_routing(ids, s["experts"], bm, one_program=one), rep=30) * 1e3
            res.append(f"{name} {us:6.1f}")
        print(f"{shape:18s} {t:5d} tok bm {bm:3d}: " + "  ".join(res), flush=True)
print("align checks passed")
