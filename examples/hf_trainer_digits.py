"""fastsam's SAMTrainer (a transformers.Trainer) on scikit-learn's bundled handwritten digits.

The model is a small ViT built from a ``ViTConfig`` (randomly initialised: no weights are downloaded) that
reads the 8x8 digits as 16 patches of 2x2 pixels. ``SAMTrainer`` builds fastsam's SAM around the AdamW the
TrainingArguments name and runs SAM's second pass itself; ``max_grad_norm`` and
``gradient_accumulation_steps`` work as in the plain Trainer.

    python examples/hf_trainer_digits.py [--method sam|asam|fsam|crsam|lastsam] [--epochs 30]

Needs: pip install 'fastsam[transformers,examples]'.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from fastsam.integrations.transformers import SAM_METHODS, SAMTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import load_data  # noqa: E402  (the data split of examples/digits.py)


class Digits(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="sam", choices=sorted(SAM_METHODS))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = load_data(torch.device("cpu"))
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)
    model = ViTForImageClassification(config)
    sam_kwargs = {"switch_at": 0.5} if args.method == "lastsam" else {}
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=64,
                                     learning_rate=2e-3, weight_decay=0.05, warmup_steps=20, max_grad_norm=1.0,
                                     lr_scheduler_type="cosine", use_cpu=True, report_to=[], save_strategy="no",
                                     logging_strategy="epoch", disable_tqdm=True, seed=0)
        trainer = SAMTrainer(model=model, args=training, train_dataset=Digits(x_train, y_train),
                             sam_method=args.method, sam_kwargs=sam_kwargs)
        trainer.train()
    model.eval()
    with torch.no_grad():
        acc = (model(pixel_values=x_test).logits.argmax(1) == y_test).float().mean().item()
    print(f"SAMTrainer ({args.method}), small ViT: test accuracy {100 * acc:.2f}% after {args.epochs} epochs")
    return acc


if __name__ == "__main__":
    main()
