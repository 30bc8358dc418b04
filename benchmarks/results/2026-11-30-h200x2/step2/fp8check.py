# Exact check on the GPU: the fp8 copies (per-token quantization, SiLU + quantization) against torch's RTNE cast.
import torch, torch.nn.functional as F, sys
sys.path.insert(0, ".")
from vllm_mxmoe.kernels.act_quant import quantize_fp8_per_token, silu_and_mul
from vllm_mxmoe.kernels.reference import fake_quant_fp8_per_token
g = torch.Generator(device="cuda").manual_seed(0)
bad = 0
for rows, cols in ((7, 200), (4096, 2048), (333, 768), (64, 1408), (16, 4096)):
    x = (torch.randn(rows, cols, device="cuda", generator=g) * torch.logspace(-3, 3, rows, device="cuda")[:, None]).bfloat16()
    q, s = quantize_fp8_per_token(x)
    ref = (x.float() / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    ok = torch.equal(q.view(torch.uint8), ref.view(torch.uint8)) and torch.equal(q.float() * s[:, None], fake_quant_fp8_per_token(x))
    bad += not ok; print("per-token", rows, cols, "exact" if ok else "MISMATCH", flush=True)
for rows, inter in ((9, 96), (5000, 768), (100, 1408), (30, 4096)):
    parts = (torch.randn(2, rows, 2 * inter, device="cuda", generator=g) * 3).bfloat16()
    slot_expert = torch.zeros(rows, dtype=torch.int32, device="cuda"); slot_expert[::5] = -1
    summed = parts.float().sum(0)
    want = fake_quant_fp8_per_token((F.silu(summed[:, :inter]) * summed[:, inter:]).bfloat16())
    live = slot_expert >= 0
    for store in (True, False):
        act, (q, s) = silu_and_mul(parts, slot_expert, torch.bfloat16, True, store_act=store)
        got = q.float() * s[:, None]
        diff = (got != want)[live].float().mean().item()
        print("silu", rows, inter, store, f"fp8 values differing from the reference: {diff:.2e}", flush=True)  # exp ulps
        bad += diff > 0.01
print("fp8 checks:", "FAIL" if bad else "ok")
