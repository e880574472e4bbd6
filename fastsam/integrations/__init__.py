"""Integrations with training frameworks; each module imports its framework (an optional extra).

- :mod:`fastsam.integrations.transformers`: ``SAMTrainer``, a ``transformers.Trainer`` that runs the extra
  passes of any fastsam optimizer (``pip install 'fastsam[transformers]'``).

PyTorch Lightning and accelerate need no integration module: a fastsam optimizer returned by
``configure_optimizers``, or passed through ``accelerator.prepare``, follows the ``step(closure)`` contract
(see the README).
"""
