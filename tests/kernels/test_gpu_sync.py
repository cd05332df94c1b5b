"""On a GPU: attention_kl forward + backward and head importance make no host synchronisation at all.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call raise, so this checks the real
launchers, the custom ops and the functional layer together (the CPU tests check the same with a dispatch mode).
"""

from __future__ import annotations

import pytest
import torch

from fastkd import importance
from fastkd.functional import attention_kl

pytestmark = pytest.mark.gpu


@pytest.fixture
def sync_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _qk(B, H, N, d, dtype, requires_grad=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=gen)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


@pytest.mark.parametrize("N", [197, 577])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_kl_forward_backward_without_sync(sync_errors, N, dtype):
    q_s, k_s = _qk(8, 6, N, 64, dtype, requires_grad=True)
    q_t, k_t = _qk(8, 12, N, 64, dtype, seed=1)
    mask = torch.ones(N, dtype=torch.bool, device="cuda")
    mask[1] = False
    calls = (  # host-value index arguments, a key mask, given LSEs
        dict(pairs=[(0, 3), (0, 7), (5, 11)], rows=[0, 5, N - 1]),
        dict(pairs=[(h, h) for h in range(6)], key_mask=mask),
        dict(pairs=[(h, h) for h in range(6)], lse_t=torch.zeros(8, 12, N, device="cuda")),
    )
    for _ in range(2):  # the second pass runs with every cache warm: the steady state
        for kw in calls:
            loss = attention_kl(q_s, k_s, q_t, k_t, reduction="batchmean", **kw)
            loss.backward()


def test_head_importance_without_sync(sync_errors):
    q, k = _qk(4, 6, 197, 64, torch.bfloat16)
    v, do = _qk(4, 6, 197, 64, torch.bfloat16, seed=2)
    for _ in range(2):
        importance.attribution_importance(q, k, v, do)
        importance.entropy_importance(q, k)
        importance.gradient_importance(v, do)
