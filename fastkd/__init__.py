"""fastkd: fast knowledge distillation for vision transformers.

Public entry points:

* :func:`fastkd.functional.attention_kl` -- streaming KL between teacher and student attention rows.
* ``fastkd`` command line (``fastkd info``, ``fastkd bench ...``, ...), see :mod:`fastkd.cli`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
