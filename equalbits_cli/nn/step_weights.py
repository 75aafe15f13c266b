"""The training weights of all binary layers of a model, built together.

A training step needs ``scale * levels`` of every binary layer in the dtype its convolution runs in.
Built layer by layer that is one Triton launch and some Python per layer; :class:`StepWeights` builds
them for the whole model at the first binary layer's forward, one launch per class of filter width
(resnet50: 8 launches instead of 52; vit_small: 2 instead of 48), and each layer takes its own as it
runs. On the CPU (``ot``) it hands all layers' numpy selection to the threads in one round. The
straight-through gradient of all of them is one autograd node per build (:meth:`StepWeights.tied`),
not one per layer: a launch-bound GPU step pays for every Python call its layers make.

A stored weight is reused while its latent is unchanged: same tensor, same storage, the same
version counter, which in-place updates through torch bump (``load_state_dict``, ``copy_``, the
per-parameter optimizers), and no optimizer step since it was built. The last is needed because
torch's fused optimizers (``AdamW(fused=True)``, which ``finetune`` uses) write the parameters without
bumping their version counters: a hook on every optimizer's step (``torch.optim.optimizer.
register_optimizer_step_post_hook``) counts the steps on each parameter it updates, and a weight
built before its latent's latest step is stale.
Writes through ``.data`` bypass both; a layer whose latent is changed that way between two forwards in
training mode would compute with the old weight until the next optimizer step, so don't (nothing in
equalbits does). Where neither path applies (CUDA without Triton, filters
wider than the kernel takes, a latent of another layout or dtype, sign and irnet on the CPU) the layer
builds its own weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quant import quantize
from ..quant.cpu_select import ot_weights_cpu
from ..quant.quantize import ot_spec

__all__ = ["StepWeights"]


_HOOK: list = []


def _count_step(optimizer, args, kwargs) -> None:
    """Count a step on each parameter it updated (those with a gradient), on the parameter itself."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p._equalbits_steps = getattr(p, "_equalbits_steps", 0) + 1


def _steps(w: torch.Tensor) -> int:
    return getattr(w, "_equalbits_steps", 0)


def _watch_optimizer_steps() -> None:
    """Count every optimizer's steps on its parameters (the hook is registered once per process): fused
    optimizers leave version counters as they are, so the count is what tells a stored weight that its
    latent moved."""
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_count_step))


@dataclass(frozen=True)
class _Entry:
    """A stored training weight and the latent it was built from: the tensor, its storage address and
    version counter, the optimizer steps taken on it so far, and the compute dtype. The cache key is
    all five: :meth:`fits`."""

    latent: torch.Tensor
    ptr: int
    version: int
    dtype: torch.dtype
    weight: torch.Tensor
    steps: int = 0

    def fits(self, w: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether this weight was built from the latent ``w`` as it is now, in ``dtype``."""
        same = self.latent is w and self.ptr == w.data_ptr() and self.version == w._version
        return same and self.dtype == dtype and self.steps == _steps(w)


class StepWeights:
    """Training weights of a fixed list of binary layers, built in grouped launches and reused until
    their latents change. Made by :func:`equalbits_cli.binarize_`; layers without one build their own."""

    def __init__(self, layers: Sequence) -> None:
        self.layers = list(layers)
        self.entries: list[_Entry | None] = [None] * len(self.layers)
        self.groupings: dict[torch.dtype, _Grouping] = {}  # how the last build split its layers, per dtype
        self.specs: dict[tuple[int, ...], list[tuple[int, int, float]]] = {}
        self.ties: dict[torch.dtype, dict[int, torch.Tensor]] = {}  # per dtype: weights tied to the latents
        self.launches = 0  # grouped launches made (for tests and benchmarks)
        for i, layer in enumerate(self.layers):
            layer._step_weights = self
            layer._step_index = i
        _watch_optimizer_steps()

    def clear(self) -> None:
        """Forget every stored weight and grouping (a layer was moved, switched mode or loaded)."""
        self.entries = [None] * len(self.layers)
        self.groupings.clear()
        self.ties.clear()

    def __getstate__(self) -> dict:
        """Copies and pickles (``copy.deepcopy(model)``, as EMA helpers do) take the layers, not what was
        built from them: weights tied into an autograd graph cannot be deep-copied, and a copy builds
        its own on its first step."""
        state = self.__dict__.copy()
        state.update(entries=[None] * len(self.layers), groupings={}, ties={})
        return state

    def _fresh(self, i: int, dtype: torch.dtype) -> torch.Tensor | None:
        entry = self.entries[i]
        return entry.weight if entry is not None and entry.fits(self.layers[i].weight, dtype) else None

    @staticmethod
    def _path(layer) -> str | None:
        """How ``layer``'s weight is built with the others: "triton" (grouped launches), "numpy" (the
        CPU's selection, all layers in one round of threads; ot only), or None (on its own)."""
        w = layer.weight
        if not layer.training or w.dim() < 2 or w.shape[0] == 0:
            return None
        layout_ok = w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last))
        if layout_ok and quantize.use_triton(w.device, w.numel() // w.shape[0], w.dtype):
            return "triton"
        if layer.config.method == "ot" and quantize.numpy_selects(w):
            return "numpy"
        return None

    def weight(self, layer, dtype: torch.dtype) -> torch.Tensor | None:
        """``layer``'s training weight in ``dtype`` (no gradient attached), or None where the layer must
        build its own. Builds the weights of every member whose latent changed, in one go."""
        i = getattr(layer, "_step_index", None)
        if i is None or i >= len(self.layers) or self.layers[i] is not layer:
            return None
        q = self._fresh(i, dtype)
        if q is not None:
            return q
        if self._path(layer) is None:
            return None
        self._build(dtype)
        return self._fresh(i, dtype)

    def tied(self, layer, dtype: torch.dtype) -> torch.Tensor | None:
        """``layer``'s stored weight with the straight-through gradient to its latent, from one autograd
        node for all members: one Python call per step in the forward and one in the backward, not one
        per layer. None in a distributed run, where each layer's own node lets DDP reduce gradients while
        the backward goes on (the tied node gives all of them at its end), and where the stored weight
        is not fresh (the layer then builds its own node)."""
        if self._fresh(layer._step_index, dtype) is None:
            return None
        ties = self.ties.get(dtype)
        if ties is None:  # the first call since the last build: made for all members at once
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                ties = self.ties[dtype] = {}
                return None
            # Stale members are tied too (a tie of theirs is never handed out: the check above comes first,
            # and the rebuild that refreshes them drops these ties).
            entries = {i: e for i, e in enumerate(self.entries) if e is not None and e.dtype == dtype}
            members = [i for i, e in entries.items() if e.latent.requires_grad]
            weights = _TiedWeights.apply([entries[i].weight for i in members], *(entries[i].latent for i in members))
            ties = self.ties[dtype] = dict(zip(members, weights))
        return ties.get(layer._step_index)

    def _grouping(self, dtype: torch.dtype, stale: tuple[int, ...], latents: tuple, ptrs: tuple[int, ...]) -> _Grouping:
        """The groups to build ``stale`` (their latents and storage addresses) in: the last build's where
        it built the same latents (same tensors, same storage: a training step's usual case), else worked
        out layer by layer."""
        last = self.groupings.get(dtype)
        if last is not None and last.stale == stale and last.ptrs == ptrs:
            if all(a is b for a, b in zip(last.latents, latents)):
                return last
        groups: dict[tuple, list[int]] = {}
        for i in stale:
            layer = self.layers[i]
            path = self._path(layer)
            if path is not None:
                cfg, w = layer.config, layer.weight
                groups.setdefault((cfg.method, bool(cfg.center), w.dtype, w.device, path), []).append(i)
        grouping = _Grouping(
            stale, latents, ptrs, [_Group(key, tuple(m), self._specs(key[0], m)) for key, m in groups.items()]
        )
        self.groupings[dtype] = grouping
        return grouping

    def _specs(self, method: str, members: list[int]) -> list[tuple[int, int, float]]:
        """``(n_minus, n_zero, mu)`` per member: they depend on shapes and configs alone."""
        specs = self.specs.get(tuple(members))
        if specs is None:
            specs = []
            for i in members:
                w, cfg = self.layers[i].weight, self.layers[i].config
                n_minus, n_zero, _, mu = ot_spec(w.numel() // w.shape[0], cfg.ratio, cfg.prune, bool(cfg.center))
                specs.append((n_minus, n_zero, mu) if method == "ot" else (0, 0, 0.0))
            self.specs[tuple(members)] = specs
        return specs

    @torch.no_grad()
    def _build(self, dtype: torch.dtype) -> None:
        stale, latents, ptrs = [], [], []
        for i, (layer, entry) in enumerate(zip(self.layers, self.entries)):
            w = layer.weight
            if entry is None or not entry.fits(w, dtype):
                stale.append(i)
                latents.append(w)
                ptrs.append(w.data_ptr())
        self.ties.pop(dtype, None)  # made from the old weights
        grouping = self._grouping(dtype, tuple(stale), tuple(latents), tuple(ptrs))
        for group in grouping.groups:  # the old weights go first: their memory can serve the new ones
            for i in group.members:
                self.entries[i] = None
        params = dict(zip(grouping.stale, grouping.latents))
        for group in grouping.groups:
            method, center, path = group.key[0], group.key[1], group.key[4]
            latents = [params[i].detach() for i in group.members]
            if path == "numpy":
                flat = [w.reshape(w.shape[0], -1) for w in latents]
                scratches = [self.layers[i]._ot_cache.scratch for i in group.members]  # shared with quantize()
                outs = ot_weights_cpu(flat, group.specs, scratches)
                outs = [q.view(w.shape).to(dtype) for q, w in zip(outs, latents)]
                self.launches += 1
            else:
                from ..quant.kernels.ot_triton import binary_rows_grouped

                outs, group.plan = binary_rows_grouped(
                    latents, group.specs, method, center=center, out_dtype=dtype, plan=group.plan
                )
                self.launches += len(group.plan.launches)
            for i, w, q in zip(group.members, latents, outs):
                self.entries[i] = _Entry(params[i], w.data_ptr(), w._version, dtype, q, _steps(params[i]))


class _Group:
    """Members built together (one method, centring, dtype, device and path), their counts, and the
    Triton launch plan once made."""

    def __init__(self, key: tuple, members: tuple[int, ...], specs: list[tuple[int, int, float]]) -> None:
        self.key, self.members, self.specs = key, members, specs
        self.plan = None


class _Grouping:
    """A build's split of its stale layers into groups, and the latents (tensors and storage) it was
    worked out for."""

    def __init__(self, stale: tuple[int, ...], latents: tuple, ptrs: tuple[int, ...], groups: list[_Group]) -> None:
        self.stale, self.latents, self.ptrs, self.groups = stale, latents, ptrs, groups


class _TiedWeights(torch.autograd.Function):
    """Forward: the stored weights (views, so that the stored tensors stay out of the graph). Backward:
    each incoming gradient unchanged to its latent (straight through; autograd casts it to the latent's
    dtype). A member unused in the forward gets no gradient, as with a node of its own."""

    @staticmethod
    def forward(ctx, weights: list[torch.Tensor], *latents: torch.Tensor):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        return tuple(q.view_as(q) for q in weights)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        return (None, *grads)
