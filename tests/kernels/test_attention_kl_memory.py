"""The streaming torch path never materializes [B, H, N, N]: measured as the peak RSS of a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, os, resource, torch
    os.environ["FASTKD_TORCH_CHUNK_ELEMS"] = str(1 << 20)
    from fastkd.functional import attention_kl
    torch.set_num_threads(2)
    B, H, N, d = 1, 2, 8192, 16
    g = torch.Generator().manual_seed(0)
    q_s = torch.randn(B, H, N, d, generator=g, requires_grad=True)
    k_s = torch.randn(B, H, N, d, generator=g, requires_grad=True)
    q_t, k_t = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)
    # warm up the allocator and libraries on a small problem, then take the baseline
    small = attention_kl(q_s[:, :, :64], k_s[:, :, :64], q_t[:, :, :64], k_t[:, :, :64], impl="torch")
    small.backward()
    q_s.grad = k_s.grad = None
    kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = kib()
    loss = attention_kl(q_s, k_s, q_t, k_t, impl="torch", rows=torch.arange(0, N, 4))
    loss.backward()
    peak = kib()
    print(json.dumps({"base_kib": base, "peak_kib": peak, "loss": float(loss),
                      "grad_finite": bool(torch.isfinite(q_s.grad).all() and torch.isfinite(k_s.grad).all())}))
    """
)


def test_streaming_path_stays_within_memory_budget():
    B, H, N = 1, 2, 8192
    one_map_mib = B * H * N * N * 4 / 2**20  # a single fp32 [B, H, N, N] map: 512 MiB
    budget_mib = 128
    assert one_map_mib >= 4 * budget_mib
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    extra_mib = (res["peak_kib"] - res["base_kib"]) / 1024
    assert res["grad_finite"] and res["loss"] > 0
    assert extra_mib < budget_mib, f"streaming attention_kl used {extra_mib:.0f} MiB extra (budget {budget_mib} MiB)"
