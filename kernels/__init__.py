"""Every implementation of fastkd's ops, installed as ``fastkd.kernels``.

One file per op holds the Triton kernels, their launchers and the ``torch.autograd.Function``
(``attention_kl.py``); ``*_torch.py`` files hold the streaming torch versions used for CPU tensors;
``reference.py`` holds the materializing eager versions that tests and benchmarks share.

The Triton modules are imported lazily (``importlib``) so that ``import fastkd`` works where triton
is missing, and so that ``TRITON_INTERPRET=1`` can be set before any kernel module is imported.
"""
