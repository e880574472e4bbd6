"""fastsam.SAM in PyTorch Lightning, on scikit-learn's bundled handwritten digits (nothing downloaded).

Automatic optimization (the default): the LightningModule returns a fastsam optimizer from
``configure_optimizers`` and is otherwise a plain module; Lightning calls ``optimizer.step(closure)`` and
fastsam runs the closure at w and at w + e (BatchNorm statistics update at w only).
Manual optimization (``--manual``): the explicit loop with ``self.manual_backward``.

    python examples/lightning_digits.py [--manual] [--epochs 10] [--precision bf16-mixed]

Needs: pip install 'fastsam[lightning,examples]'.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import lightning
import torch
import torch.nn.functional as F

import fastsam
from fastsam.utils import frozen_bn_stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import load_data, make_model  # noqa: E402  (the data split and the CNN of examples/digits.py)


class DigitsSAM(lightning.LightningModule):
    """Automatic optimization: nothing here knows that the optimizer takes two passes."""

    def __init__(self, lr: float = 0.05, rho: float = 0.05):
        super().__init__()
        self.model, self.lr, self.rho = make_model(), lr, rho

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.model(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = fastsam.SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=0.9,
                          weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DigitsSAMManual(DigitsSAM):
    """Manual optimization: the explicit SAM loop."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers().optimizer  # the fastsam optimizer under Lightning's wrapper
        loss = F.cross_entropy(self.model(x), y)
        self.manual_backward(loss)  # pass 1 at w
        opt.first_step(zero_grad=True)  # w -> w + e
        with frozen_bn_stats(self.model):  # BatchNorm statistics update in pass 1 only
            self.manual_backward(F.cross_entropy(self.model(x), y))  # pass 2 at w + e
        opt.second_step(zero_grad=True)  # restore w, SGD step
        self.lr_schedulers().step()
        self.log("train_loss", loss, prog_bar=True)
        return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual", action="store_true", help="manual optimization (first_step/second_step)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = load_data(torch.device("cpu"))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=64,
                                        shuffle=True, generator=torch.Generator().manual_seed(1))
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test), batch_size=450)
    module = DigitsSAMManual() if args.manual else DigitsSAM()
    trainer = lightning.Trainer(max_epochs=args.epochs, accelerator="cpu", precision=args.precision, logger=False,
                                enable_checkpointing=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train, test)
    acc = trainer.validate(module, test, verbose=False)[0]["test_acc"]
    print(f"{'manual' if args.manual else 'automatic'} optimization, {args.precision}: "
          f"test accuracy {100 * acc:.2f}% after {args.epochs} epochs")
    return acc


if __name__ == "__main__":
    main()
