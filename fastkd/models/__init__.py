"""Teachers and students: timm models by name, local weights, attention taps.

* :func:`build_model` -- ``timm.create_model(name, pretrained=False, ...)`` + a local weights file
  (``.safetensors``, ``.pth``/``.pt`` with ``weights_only=True``, ``.npz``); never downloads.
* :class:`Teacher` -- frozen, eval, ``no_grad`` wrapper that re-normalizes a student-normalized batch.
* :class:`AttentionTaps` -- records ``q``, ``k`` (``[B, H, N, d]``, after q_norm/k_norm, before scaling),
  the scale, and optionally ``v``, the per-head output and its gradient, and the LSE, for chosen blocks,
  while the forward stays on fused attention.

Example::

    from fastkd.models import build_model, Teacher, AttentionTaps
    teacher = Teacher(build_model("deit_base_patch16_224", weights="deit_base.safetensors"))
    student = build_model("deit_tiny_patch16_224")
    t_taps = AttentionTaps(teacher, blocks=[-1], record="qk")
    s_taps = AttentionTaps(student, blocks=[-1], record="qk")
    logits_t, logits_s = teacher(images), student(images)
    t, s = t_taps[-1], s_taps[-1]           # AttentionRecord: .q .k [B,H,N,d], .scale, .lse (or None)
"""

from fastkd.models import involution  # noqa: F401  (registers RedNet / involution models with timm)
from fastkd.models.build import CheckpointError
from fastkd.models.build import LoadReport
from fastkd.models.build import build_model
from fastkd.models.build import load_weights
from fastkd.models.build import read_state_dict
from fastkd.models.taps import AttentionRecord
from fastkd.models.taps import AttentionTaps
from fastkd.models.taps import attention_modules
from fastkd.models.taps import resolve_blocks
from fastkd.models.taps import unwrap_model
from fastkd.models.teacher import Teacher

__all__ = [
    "AttentionRecord",
    "AttentionTaps",
    "CheckpointError",
    "LoadReport",
    "Teacher",
    "attention_modules",
    "build_model",
    "load_weights",
    "read_state_dict",
    "resolve_blocks",
    "unwrap_model",
]
