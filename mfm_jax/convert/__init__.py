"""PyTorch ⇄ JAX weight conversion (uda_reference.md §1.5, §5).

``torch_io`` reads ``.pth`` files safely (``weights_only``) and picks student / teacher / ImageNet
weights; ``mapping`` renames and re-lays-out tensors strictly in both directions; ``cli`` (run as
``python -m mfm_jax.convert``) writes Orbax checkpoints for ``config.init_from`` and exports back.
torch is an optional dependency, imported only where a ``.pth`` is read or written.
"""
