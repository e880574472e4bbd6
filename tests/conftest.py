import os

import torch

# Triton runs on the CPU only in its interpreter, which must be switched on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
