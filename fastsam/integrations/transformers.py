r"""Hugging Face ``transformers.Trainer`` with the extra passes of a fastsam optimizer: :class:`SAMTrainer`.

The Trainer runs one forward/backward pass per micro-batch, then (on the last micro-batch of an accumulation
window) clips the grads, calls ``optimizer.step()`` and zeroes the grads. :class:`SAMTrainer` keeps that loop
and adds the method's passes at the end of each window, as the README's accumulation recipe does:

1. every micro-batch of the window: the Trainer's own pass at w (BatchNorm statistics update here only);
2. ``first_step``; every micro-batch again at w + e, through the Trainer's own ``training_step`` (so the loss
   scaling of gradient accumulation, ``num_items_in_batch``, autocast and the GradScaler are the Trainer's),
   with BatchNorm statistics frozen; CR-SAM: ``second_step`` and every micro-batch at w - e;
3. the Trainer clips the last pass's grads (``max_grad_norm``) and calls ``optimizer.step()``, which finishes
   the fastsam step (restore w, the base optimizer's update).

A step whose ``opt.sharpness_active`` is False (LastSAM before its switch, the steps between two under
``interval=k``) is one pass: step 2 is left out. With fp16 (a GradScaler), ``first_step`` gets the Trainer's scaler.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import torch

try:
    import transformers
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("fastsam.integrations.transformers needs transformers: pip install 'fastsam[transformers]'") from e

import fastsam
from fastsam.optim._passes import bn_stats_frozen

# sam_method -> the optimizer class it builds.
SAM_METHODS = {
    "sam": fastsam.SAM,
    "asam": fastsam.ASAM,
    "fsam": fastsam.FriendlySAM,
    "crsam": fastsam.CRSAM,
    "lastsam": fastsam.LastSAM,
    "gsam": fastsam.GSAM,
    "wsam": fastsam.WSAM,
    "looksam": fastsam.LookSAM,
}


class SAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with a fastsam optimizer, its extra passes included.

    Args:
        *args, **kwargs: as for ``transformers.Trainer``. ``optimizers=(opt, scheduler)`` may hold a fastsam
            optimizer (SAM, ASAM, FriendlySAM, CRSAM, LastSAM, GSAM, WSAM, LookSAM) built over the model's
            parameters; ``scheduler`` may be None (the Trainer then builds its own on ``opt``).
        sam_method: "sam", "asam", "fsam", "crsam", "lastsam", "gsam", "wsam" or "looksam": build that optimizer
            around the base optimizer the TrainingArguments name (``optim``, ``learning_rate``, ``weight_decay``, betas,
            eps), with the Trainer's weight-decay groups (named parameters, so ASAM's "weight" rule applies).
            Default "sam" when ``optimizers`` holds no optimizer. Not allowed together with an optimizer instance.
        sam_kwargs: the method's own options (``rho``, ``adaptive``, ``eta``, ``switch_at``, ...). For LastSAM
            with a fractional ``switch_at``, ``total_steps`` defaults to the Trainer's number of training steps.

    Raises:
        ValueError / TypeError at construction for an unknown ``sam_method``, ``sam_kwargs`` that are not a
        dict, an optimizer that is not a fastsam one, both an optimizer and ``sam_method``, or CR-SAM's
        ``mode="paper"`` (its third step needs the three losses, which ``Trainer``'s ``optimizer.step()``
        does not pass).

    Example::

        trainer = SAMTrainer(model=model, args=TrainingArguments(output_dir="out", learning_rate=5e-5),
                             train_dataset=ds, sam_method="sam", sam_kwargs={"rho": 0.05})
        trainer.train()
    """

    def __init__(self, *args, sam_method: Optional[str] = None, sam_kwargs: Optional[Dict[str, Any]] = None,
                 **kwargs):
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        if sam_method is not None and sam_method not in SAM_METHODS:
            raise ValueError(f"sam_method must be one of {sorted(SAM_METHODS)}, got {sam_method!r}")
        if sam_kwargs is not None and not isinstance(sam_kwargs, dict):
            raise TypeError(f"sam_kwargs must be a dict, got {type(sam_kwargs).__name__}")
        if optimizer is not None:
            if sam_method is not None or sam_kwargs:
                raise ValueError("pass either optimizers=(fastsam optimizer, scheduler) or sam_method/sam_kwargs, "
                                 "not both")
            if not isinstance(optimizer, fastsam.SAM):
                raise TypeError("SAMTrainer needs a fastsam optimizer (fastsam.SAM, ASAM, FriendlySAM, CRSAM, "
                                f"LastSAM) in optimizers=, got {type(optimizer).__name__}; or pass sam_method=")
            _check_crsam_mode(getattr(optimizer, "mode", None))
        elif sam_method is None:
            sam_method = "sam"
        self.sam_method = sam_method  # None: the optimizer was given
        self.sam_kwargs = dict(sam_kwargs or {})
        if sam_method == "crsam":
            _check_crsam_mode(self.sam_kwargs.get("mode"))
        self._window: List[Tuple[Any, Any]] = []  # the micro-batches of the accumulation window so far
        super().__init__(*args, **kwargs)

    # ---- the optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.sam_method is not None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            trained = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [{"params": [(n, p) for n, p in trained if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [(n, p) for n, p in trained if n not in decay], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
            base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)):
                raise TypeError(f"TrainingArguments.optim={self.args.optim!r} gives {base_cls!r}, not a "
                                "torch.optim.Optimizer class that a fastsam optimizer can wrap")
            options = dict(self.sam_kwargs)
            planned = self.state.max_steps  # set by train() before it builds the optimizer
            if (self.sam_method == "lastsam" and isinstance(options.get("switch_at"), float)
                    and "total_steps" not in options and planned):
                options["total_steps"] = planned
            self.optimizer = SAM_METHODS[self.sam_method](groups, base_cls, **options, **base_kwargs)
        return super().create_optimizer(model)

    def _fastsam_optimizer(self) -> fastsam.SAM:
        """The fastsam optimizer under accelerate's wrapper."""
        opt = self.optimizer
        while not isinstance(opt, fastsam.SAM) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, fastsam.SAM):
            raise TypeError(f"SAMTrainer's optimizer is {type(opt).__name__}, not a fastsam optimizer")
        return opt

    # ---- the passes -----------------------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: Dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's pass at w on this micro-batch; at the end of an accumulation window, also the later
        passes of the fastsam step on every micro-batch of the window (see the module docstring). Returns
        the loss at w, as the Trainer reports it."""
        opt = self._fastsam_optimizer()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return loss
        window, self._window = self._window, []
        if not opt.sharpness_active:  # LastSAM before its switch, a step between two under interval=k
            return loss  # one pass: Trainer's optimizer.step() is the base optimizer's step
        opt.first_step(zero_grad=True, grad_scaler=self.accelerator.scaler)
        with bn_stats_frozen() if opt.freeze_bn else contextlib.nullcontext():
            self._passes(model, window)  # at w + e
            if isinstance(opt, fastsam.CRSAM):
                opt.second_step(zero_grad=True)
                self._passes(model, window)  # at w - e
        return loss

    def _passes(self, model: torch.nn.Module, window: List[Tuple[Any, Any]]) -> None:
        for inputs, num_items_in_batch in window:
            super().training_step(model, inputs, num_items_in_batch)


def _check_crsam_mode(mode: Optional[str]) -> None:
    if mode == "paper":
        raise ValueError("SAMTrainer supports CRSAM(mode='authors') only: mode='paper' needs the three losses at "
                         "its third step, which Trainer's optimizer.step() does not pass")
