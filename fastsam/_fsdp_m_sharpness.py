"""m-sharpness under FSDP2: every rank perturbs its own full copy of w with the grad of its own batch.

Under DDP every rank holds all of w, and a rank perturbs it with its local grad by skipping the all-reduce
of the pass at w. Under FSDP2 (``fully_shard``) a rank holds a shard of w, and the forward pass all-gathers
the full w into a module's unsharded parameters just before the module runs: the ranks see the same w. The
per-rank perturbation is therefore made in those unsharded parameters, module by module, and the sharded w
is never moved:

1. The pass at w: a forward pre-hook on every FSDP module (it runs after FSDP's own, which all-gathers)
   copies the module's unsharded w into a full-size tensor of this rank, in the dtype of the optimizer's
   parameters. The backward pass is ``torch.autograd.grad`` with respect to the unsharded parameters: the
   grads of this rank's batch are neither reduce-scattered nor put in ``.grad``.
2. A twin of the optimizer (the same method, with its group options, over those full-size tensors) moves
   them to ``w + e_r`` with the method's own fused first step. Its norm is this rank's own, as under DDP.
3. The later pass: the pre-hook copies ``w + e_r`` into the unsharded parameters after each all-gather, and
   a saved-tensor hook hands the backward pass ``w + e_r`` wherever the forward pass saved a parameter (FSDP
   all-gathers w again for the backward pass of a module it resharded after the forward). That backward
   pass is synced: FSDP's reduce-scatter averages the grads at the ranks' own points into the sharded
   ``.grad``.
4. The optimizer, told that the perturbation was made elsewhere, keeps the sharded w and updates it with
   those grads (the fused restore + update, with nothing to restore).

Cost against ``sync_first_pass=True``: one reduce-scatter less per step (the pass at w only all-gathers) and
no all-reduce of the norm; but each rank holds full-size tensors of its own: three per parameter (its grad,
w + e_r and the twin's backup of w) while the perturbation is made, then w + e_r (in the unsharded dtype)
through the later pass. That is the memory of an unsharded model, for the time of one step (Friendly SAM's
per-rank EMA, one more full-size tensor per parameter, stays: see ``FriendlySAM(per_rank_ema=True)``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Set, Tuple

import torch
from torch import Tensor

from fastsam.optim import SAM
from fastsam.optim._buckets import UNSTARTED
from fastsam.optim._sharding import is_dtensor, local, mesh_dims

# A name -> unsharded parameter callback, run for each parameter of an FSDP module about to run forward.
OnUnsharded = Callable[[str, Tensor], None]


class LocalPerturbation:
    """One step's per-rank perturbation of the full parameters of an FSDP2 ``model`` (see the module
    docstring). ``optimizer`` steps ``model``'s sharded parameters and has a twin (SAM, ASAM, LastSAM, and
    FriendlySAM with ``per_rank_ema``)."""

    def __init__(self, optimizer: SAM, model: torch.nn.Module, fsdp_module_type: type) -> None:
        self.optimizer = optimizer
        self.name_of = {p: name for name, p in model.named_parameters()}
        self.param_of = {name: p for p, name in self.name_of.items()}
        strays = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]
                  if p not in self.name_of or not is_dtensor(p)]
        if strays:
            raise ValueError(f"sync_first_pass=False under FSDP2 perturbs the parameters that fully_shard made of "
                             f"the model's own; the optimizer also steps {len(strays)} other parameter(s) (shapes "
                             f"{strays[:3]}): pass the model's parameters only, or use sync_first_pass=True")
        meshes = mesh_dims(p for g in optimizer.param_groups for p in g["params"])
        if meshes != {1}:
            # On HSDP's and TP's 2-D meshes the unsharded parameters differ (DTensors under TP): not made yet.
            raise ValueError(f"sync_first_pass=False under FSDP2 supports parameters sharded on a 1-D device mesh; "
                             f"this model's meshes have {sorted(meshes)} dimensions: use sync_first_pass=True")
        self.fsdp_modules = [(prefix, m) for prefix, m in model.named_modules() if isinstance(m, fsdp_module_type)]
        self.copies: Dict[str, Tensor] = {}  # this rank's full-size w, then w + e_r, by parameter name
        self.moved: Dict[str, Tensor] = {}  # w + e_r in the dtype of the unsharded parameter, where it moved
        self.seen: Set[str] = set()  # the parameters the pass at w saw unsharded

    @contextlib.contextmanager
    def _on_unsharded(self, callback: OnUnsharded) -> Iterator[None]:
        """Inside the block, ``callback(name, parameter)`` for every unsharded parameter of an FSDP module
        about to run forward (FSDP's pre-hook, registered first, has all-gathered it); parameters still
        sharded belong to a nested FSDP module, whose own hook sees them."""
        def hook(prefix: str, module: torch.nn.Module, args) -> None:
            for name, p in module.named_parameters(prefix=prefix):
                if not is_dtensor(p) and name in self.param_of:
                    callback(name, p)
        handles = [m.register_forward_pre_hook(lambda module, args, prefix=prefix: hook(prefix, module, args))
                   for prefix, m in self.fsdp_modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def pass_at_w(self, forward: Callable[[], Tensor]) -> Tensor:
        """Runs ``forward()`` (returns the loss) and its backward pass for this rank's grads only, then
        moves this rank's full copies to w + e_r. Returns the loss."""
        leaves: Dict[str, Tensor] = {}
        self.copies, self.moved = {}, {}

        def capture(name: str, p: Tensor) -> None:
            leaves[name] = p
            if name not in self.copies:  # a module run twice sees the same w
                self.copies[name] = p.detach().to(self.param_of[name].dtype, copy=True)
        with self._on_unsharded(capture):
            loss = forward()
        self.seen = set(leaves)
        names = [n for n, p in leaves.items() if p.requires_grad]
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True) if names else ()
        with torch.no_grad():
            self._perturb({n: g for n, g in zip(names, grads) if g is not None},
                          {n: leaves[n].dtype for n in names})
        return loss

    def _perturb(self, grads: Dict[str, Tensor], dtypes: Dict[str, torch.dtype]) -> None:
        """Moves the copies that got a grad, in the groups the optimizer perturbs, to w + e_r (``grads`` and
        ``dtypes``: those of the unsharded parameters, by name). The twin's buffers that carry over (Friendly
        SAM's EMA) are this rank's own part of the optimizer's per-rank state, updated in place."""
        groups, members_all, moved = [], [], []
        for group in self.optimizer.param_groups:
            members = [self.name_of[p] for p in group["params"] if self.name_of[p] in grads]
            if not members:
                continue
            for name in members:
                self.copies[name].grad = grads[name].to(self.param_of[name].dtype)
            twin_group = {**group, "params": [self.copies[n] for n in members]}
            if "param_names" in group:  # ASAM tells weights from biases by name
                twin_group["param_names"] = members
            groups.append(twin_group)
            members_all += members
            if self.optimizer._moves(group):
                moved += members
        if groups:
            twin = self.optimizer._twin(groups)
            for name in members_all:
                self._lend_per_rank_state(twin, name)
            twin.first_step()
        # Only what moved is applied in the later pass; the rest of w stays as FSDP all-gathers it.
        self.moved = {n: self.copies[n].to(dtypes[n]) for n in moved}
        for n in members_all:
            self.copies[n].grad = None
        self.copies = {}

    def _lend_per_rank_state(self, twin: SAM, name: str) -> None:
        """Puts this rank's part of the optimizer's per-rank buffers of parameter ``name`` in the twin's state
        (a view: the twin's step updates them), made zero-filled the first time; the twin then treats the
        parameter as new, as a fresh optimizer does."""
        per_rank = self.optimizer._per_rank_buffers
        if not per_rank:
            return
        p = self.param_of[name]
        st, twin_st = self.optimizer.state[p], twin.state[self.copies[name]]
        fresh = st.pop(UNSTARTED, False)
        for twin_key, key in per_rank.items():
            if key not in st:
                st[key] = self.optimizer._zero_buffer(p, key)
                fresh = True
            twin_st[twin_key] = local(st[key])[0]  # this rank's own: [1, *shape] -> [*shape], same storage
        if fresh:
            twin_st[UNSTARTED] = True

    def later_pass(self, forward: Callable[[], Tensor]) -> Tuple[Tensor, Callable[[], None]]:
        """Runs ``forward()`` at this rank's w + e_r: returns the loss, and a function that frees the
        perturbation once the backward pass is done. Raises RuntimeError if the pass at w of this step did
        not run through :meth:`pass_at_w` (the caller ran it: it was synced, and w was perturbed as such)."""
        if not self.optimizer._step_perturbed_elsewhere:
            raise RuntimeError("sync_first_pass=False under FSDP2: the pass at w of this step did not run through "
                               "the closure (a backward pass before step(closure)?), so it was reduce-scattered and "
                               "no rank has its own perturbation; let step(closure) run every pass")
        # The storages of the unsharded parameters set to w + e_r in this pass -> (parameter, w + e_r).
        at_point: Dict[int, Tuple[Tensor, Tensor]] = {}

        def apply(name: str, p: Tensor) -> None:
            value = self.moved.get(name)
            if value is not None:
                p.data.copy_(value)  # through .data: autograd's version counter of the parameter stays
                at_point[p.untyped_storage()._cdata] = (p, value)

        def pack(t: Tensor):
            if type(t) not in (Tensor, torch.nn.Parameter) or t.layout != torch.strided:
                return t
            hit = at_point.get(t.untyped_storage()._cdata)
            if hit is None:
                return t
            p, value = hit  # t is p or a view of it: the same view of w + e_r
            return _SavedView(value, t.size(), t.stride(), t.storage_offset() - p.storage_offset())

        def unpack(saved):
            return saved.view_of_value() if isinstance(saved, _SavedView) else saved

        def release() -> None:
            self.moved = {}
            for _, m in self.fsdp_modules:  # no unsharded parameter keeps w + e_r into the next forward pass
                m.reshard()
        try:
            with self._on_unsharded(apply), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                loss = forward()
        except BaseException:
            release()
            raise
        return loss, release

    def check_unseen(self) -> None:
        """After the later pass's backward: raises RuntimeError if a parameter got a grad there that the pass
        at w never saw unsharded (its module ran outside its forward call, where FSDP's and these hooks
        do not run): it was not perturbed."""
        unseen = [self.name_of[p] for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None and self.name_of[p] not in self.seen]
        if unseen:
            raise RuntimeError(f"parameters {unseen[:3]} got grads in the later pass but were not all-gathered by a "
                               "forward call of their FSDP module in the pass at w, so their per-rank perturbation "
                               "was not made (sync_first_pass=False under FSDP2); use sync_first_pass=True")


class _SavedView:
    """What the backward pass gets for a saved unsharded parameter (or a view of it): the same view of
    w + e_r."""

    def __init__(self, value: Tensor, size, stride, offset: int) -> None:
        self.value, self.size, self.stride, self.offset = value, size, stride, offset

    def view_of_value(self) -> Tensor:
        return self.value.as_strided(self.size, self.stride, self.offset)
