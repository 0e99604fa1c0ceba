"""Fit probe of ``bench_train.py --probe_layers K``: whether a length fits in GPU memory, from a training step
stopped once K decoder layers have finished their backward.

At the lengths where the modes reach their limits a whole step takes longer than a device call may run (the
attention's work grows with S^2), but whether the step fits is decided early in its backward. The forward
leaves one checkpoint per decoder layer (on the GPU or offloaded) and every decoder layer's backward then
has the same working set: its checkpoint (brought back), its recompute, its gradients and ZeRO-3's gathered
weights. The first backward, right after the loss, is the largest, because the loss's own backward (LM head,
cross-entropy, final norm) runs in it too; from the second on, the peak stays flat. So the GPU peak after K
layers' backward (K >= 1, the loss included) is the whole step's peak, and K = 2 shows that the second
layer's backward added nothing. The assumption: the layers are alike (one shape, one configuration; a
mode that offloads only the first N layers' checkpoints breaks it, as does a slice of unlike layers).
The one phase of a step the probe never reaches is the optimizer step; by then the activations are gone, so
it is the same at every length, and the bench's warm-up step at a short length (``--warm_seq_len``)
runs it: the record's ``peak_gib`` (the larger of the two steps' peaks) bounds the whole step's.

Mechanics: a forward pre-hook on each decoder layer (outside transformers' checkpoint, which wraps the
layer's ``forward``, not its ``__call__``) puts a tensor hook on the layer's input hidden states while the
probed forward runs. That hook fires when the gradient of the layer's input is complete: every node of the
layer's backward has run and its weights' gradients were accumulated (autograd runs a ready
``AccumulateGrad`` before any other node). After the K-th it raises :class:`ProbeStop`, which ends
``loss.backward()``: the rest of the backward and the optimizer step never run. A stopped backward leaves
DeepSpeed's ZeRO-3 (0.19.8) mid-step: its epilogue (queued as an autograd callback, which an errored backward
never runs) did not reduce the last gradient bucket, the stopped layer's gathered weights were not released
(the hook fires before ZeRO's post-backward function on the layer's input), and its hook counters and
prefetch trace are half-way. A next step would mix the probe's unreduced gradients into its own, so a probe
step is the run's last: every rank stops at the same layer, having issued the same collectives, and the
ranks leave together.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch


class ProbeStop(Exception):
    """Raised from the K-th probed layer's backward hook to end the backward (the bench catches it)."""


class LayerBackward(NamedTuple):
    """One decoder layer's backward as the probe saw it finish: the layer's index in the model, the GPU peak
    so far (GiB), the seconds since the step began, and how many of the layer's parameters had their
    gradient accumulated by then."""

    layer: int
    peak_gib: float
    seconds: float
    params_with_gradient: int


class FitProbe:
    """Counts decoder layers' backwards during one armed step and stops the backward after ``stop_after``.

    Args:
        layers: the model's decoder layers, in forward order (``model.model.layers``).
        stop_after: K, the layers whose backward completes before the stop (1 <= K <= len(layers)).
        peak_gib: the GPU peak so far (``Memory.peak() / 2**30``; 0 on CPU).
        sync: waits for the device's queued work (so the seconds are the device's), a no-op on CPU.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], stop_after: int, peak_gib: Callable[[], float],
                 sync: Callable[[], None] = lambda: None):
        if not 1 <= stop_after <= len(layers):
            raise ValueError(f"stop_after {stop_after}: must be between 1 and the model's {len(layers)} layers")
        self.layers = list(layers)
        self.stop_after = stop_after
        self.peak_gib, self.sync = peak_gib, sync
        self.done: List[LayerBackward] = []
        self._forward = False  # an armed step's forward is running: its layers' inputs get hooks
        self._t0 = 0.0
        self._grads: Dict[int, int] = {}  # id(param) -> times its gradient was accumulated in the armed step
        self._handles = []
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook_input(i), with_kwargs=True))
            for p in layer.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._count_gradient))

    # ---- the step's phases ----
    def arm(self) -> None:
        """The next forward is the probed step's: start counting (and the clock) now."""
        self.done, self._grads = [], {}
        self._t0 = time.perf_counter()
        self._forward = True

    def forward_done(self) -> None:
        """The forward ended; layers run from now on (a recompute in backward) are not hooked again."""
        self._forward = False

    def disarm(self) -> None:
        self._forward = False

    def remove(self) -> None:
        """Take every hook off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def phase(self) -> str:
        """Where the armed step is: ``forward``, or ``backward of layer i`` (the layer whose backward was
        running: the last layer's includes the loss's backward), or ``backward after the layers``."""
        if self._forward:
            return "forward"
        n = len(self.layers) - 1 - len(self.done)
        return f"backward of layer {n}" if n >= 0 else "backward after the layers"

    def layers_with_gradients(self) -> List[int]:
        """Indices of the decoder layers of which some parameter got a gradient in the armed step."""
        return [i for i, layer in enumerate(self.layers) if self._params_with_gradient(layer)]

    # ---- hooks ----
    def _count_gradient(self, p: torch.Tensor) -> None:
        self._grads[id(p)] = self._grads.get(id(p), 0) + 1

    def _params_with_gradient(self, layer: torch.nn.Module) -> int:
        return sum(1 for p in layer.parameters() if id(p) in self._grads)

    def _hook_input(self, index: int):
        def pre_hook(module, args, kwargs):
            if not self._forward:
                return None
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda grad: self._layer_done(index))
            return None
        return pre_hook

    def _layer_done(self, index: int) -> None:
        if any(d.layer == index for d in self.done):
            return
        self.sync()
        self.done.append(LayerBackward(layer=index, peak_gib=self.peak_gib(),
                                       seconds=time.perf_counter() - self._t0,
                                       params_with_gradient=self._params_with_gradient(self.layers[index])))
        if len(self.done) >= self.stop_after:
            raise ProbeStop(f"stopped after {len(self.done)} decoder layers' backward")

    def record(self) -> Dict:
        """The armed step's probe record (after :class:`ProbeStop`): K, the layers' backwards in the order
        they finished, and which layers' parameters got gradients."""
        return {"layers": self.stop_after, "stopped_after_layer_backward": len(self.done),
                "layer_backwards": [d._asdict() for d in self.done],
                "layers_with_gradients": self.layers_with_gradients(),
                "params_per_layer": [sum(1 for p in layer.parameters() if p.requires_grad) for layer in self.layers]}


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (``model.model.layers``), in forward order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return list(decoder.layers)


def step_plan(*, seq_len: int, steps: int, probe_layers: int, warm_seq_len: int,
              multiple: int) -> List[Tuple[int, str]]:
    """A bench run's steps as ``(tokens, kind)``: a whole warm-up step (``"warm"``) at ``warm_seq_len`` rounded
    up to a multiple of ``multiple`` (the ds_longctx block's sequence multiple; none when ``warm_seq_len`` is
    0), then ``steps`` training steps (``"train"``) at ``seq_len``, or for a fit probe (``probe_layers`` > 0)
    the probe (``"probe"``) at ``seq_len``."""
    warm = [(-(-warm_seq_len // multiple) * multiple, "warm")] if warm_seq_len else []
    return warm + ([(seq_len, "probe")] if probe_layers else [(seq_len, "train")] * steps)


def is_warm_step(row: Dict) -> bool:
    """Whether a bench record's step row is the warm-up step at ``--warm_seq_len`` (``"probe_warm"`` in
    records written before training runs could have one)."""
    return bool(row.get("warm_step") or row.get("probe_warm"))


def probe_summary(rows: Sequence[Dict]) -> Optional[Dict]:
    """The summary of a probe run from its step rows: the probed step's peak (``probe_peak_gib``), its forward
    peak, the peaks after each layer's backward, its seconds and host memory; no rates (no step finished).
    None when no probed step finished (it ran out of memory: the record's ``oom`` says where)."""
    probed = [r for r in rows if "probe" in r]
    if not probed:
        return None
    r = probed[-1]
    out = {"probe_peak_gib": r["peak_gib"], "probe_forward_peak_gib": r.get("forward_peak_gib"),
           "probe_layer_backward_peaks_gib": r["layer_backward_peaks_gib"], "probe_seconds": r["seconds"],
           "probe_layers": r["probe"]["layers"], "peak_gib": max(x["peak_gib"] for x in rows)}
    for k in ("host_pinned_gib", "host_pool_gib", "host_pinned_allocator_gib", "host_pinned_total_gib",
              "host_rss_gib"):
        if k in r:
            out[f"probe_{k}"] = r[k]
    return out


__all__ = ["FitProbe", "LayerBackward", "ProbeStop", "decoder_layers", "probe_summary", "step_plan"]
