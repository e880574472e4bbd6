import os

import torch

# Triton runs on the CPU only in its interpreter, which must be switched on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The trajectory tests compare runs of 20 steps on the GPU: TF32 convolutions and matmuls (cuDNN's default)
    # and non-deterministic conv backward algorithms would part two runs by more than the optimizers' math does.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
