"""The CLIP-MLP facial-affect pipeline (Aff-Wild2 EXPR and AU) on fastsam's CVaR losses and SAM optimizers.

frozen CLIP image tower (:mod:`.encoder`, :mod:`.preprocess`) -> feature bank on disk (:mod:`.bank`, from
the annotation readers of :mod:`.data`) -> MLP (:mod:`.model`) trained with CVaR + SAM (:mod:`.train`) ->
macro F1 (:mod:`.metrics`). ``python -m fastsam.affect`` (:mod:`.cli`) runs each stage; ``make-demo``
(:mod:`.demo`) writes a synthetic dataset and a tiny encoder so that all of it runs with no download.
The submodules are imported on use: the image code needs Pillow, which the optimizers do not.
"""
from fastsam.affect.tasks import AU, EXPR, TASKS, Task, get_task

__all__ = ["Task", "EXPR", "AU", "TASKS", "get_task"]
