"""AdamW whose two moments live in (page-locked) host memory and stream through the GPU chunk by chunk.

Under ZeRO-3 without optimizer offload a rank holds, per parameter of its shard, 2 bytes of bf16 parameter,
2 of bf16 gradient, 4 of fp32 master weight and 8 of Adam moments: the moments are half of the model state.
:class:`HostStateAdamW` keeps them in host memory (exactly page-locked with :func:`~.pinned.pin_exact` when
CUDA is present) and updates each parameter where it lives: a parameter is walked in chunks of
``chunk_numel`` elements, each chunk's moments are copied into a device staging slot (host to device on one
side stream), updated together with the parameter and gradient chunk on the current stream, and copied back
(device to host on another side stream). With three slots the copy in of chunk ``i + 1`` and the copy out of
chunk ``i - 1`` run while chunk ``i`` is updated; PCIe carries 8 bytes per element each way and step.

The update is ``torch.optim.AdamW``'s: on CUDA its fused kernel (``torch._fused_adamw_``) over the chunk, else
the arithmetic of its single-tensor path, element for element, so a chunk gives the same bits as the whole
tensor. On a machine without CUDA the moments are plain host tensors and the same walk runs synchronously.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .pinned import can_register, pin_exact

#: Staging slots per device: one being filled, one being updated, one being drained.
STAGING_SLOTS = 3
#: The moment names in ``state`` (as ``torch.optim.AdamW``'s).
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(eq=False)
class StagingSlot:
    """Device buffers one chunk's moments pass through, and the events that order the streams using them.

    Attributes:
        exp_avg, exp_avg_sq: ``[capacity]`` on the parameters' device.
        loaded: recorded on the copy-in stream once the chunk's moments are in the slot.
        updated: recorded on the current stream once the update has read and written the slot.
        drained: recorded on the copy-out stream once the slot's moments are back in host memory; the next
            copy into the slot waits for it.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    loaded: Optional[torch.cuda.Event] = None
    updated: Optional[torch.cuda.Event] = None
    drained: Optional[torch.cuda.Event] = None


class ChunkTransfer(NamedTuple):
    """One chunk of one parameter on its way host -> device -> host: ``[numel]`` views each."""

    param: torch.Tensor  # of the parameter, updated in place
    grad: torch.Tensor
    host_exp_avg: torch.Tensor  # of the host moments
    host_exp_avg_sq: torch.Tensor
    slot: StagingSlot


@dataclass(eq=False)
class _Staging:
    """The slots of one (device, dtype) and, on CUDA, the two copy streams."""

    slots: List[StagingSlot]
    capacity: int
    copy_in: Optional[torch.cuda.Stream] = None
    copy_out: Optional[torch.cuda.Stream] = None


class HostStateAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, no amsgrad, no maximize) with ``exp_avg`` / ``exp_avg_sq``
    in host memory, the update streamed through the parameters' device ``chunk_numel`` elements at a time.

    Parameters may be anywhere (ZeRO-3 hands it its fp32 flat partitions, ``[shard]`` on the GPU); each must be
    contiguous. ``state[p]`` holds ``step`` (a float32 scalar tensor on the CPU, as AdamW's) and the two moments,
    shaped as ``p``, on the host. ``state_dict()`` returns the host moments; ``load_state_dict`` copies the saved
    ones into fresh host (page-locked) tensors without passing them through the device."""

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 chunk_numel: int = 1 << 24, fused: Optional[bool] = None):
        if amsgrad:
            raise ValueError("HostStateAdamW does not implement amsgrad (its third state would stream too); "
                             "use amsgrad=False or torch.optim.AdamW")
        if maximize:
            raise ValueError("HostStateAdamW does not implement maximize; negate the loss instead")
        if not 0.0 <= lr or not 0.0 <= eps or not 0.0 <= weight_decay:
            raise ValueError(f"invalid lr {lr}, eps {eps} or weight_decay {weight_decay}: must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}: each in [0, 1)")
        if chunk_numel < 1:
            raise ValueError(f"chunk_numel {chunk_numel}: must be positive")
        self.chunk_numel = int(chunk_numel)
        #: None: the fused kernel on CUDA, the single-tensor arithmetic elsewhere (True forces the kernel).
        self.fused = fused
        self._staging: Dict[Tuple[torch.device, torch.dtype], _Staging] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # ---- state -----------------------------------------------------------------------------------------------

    @staticmethod
    def _host_zeros(like: torch.Tensor) -> torch.Tensor:
        """``like``'s shape and dtype in host memory, zero; page-locked exactly when CUDA is present."""
        if can_register():
            return pin_exact(like.shape, like.dtype).tensor.zero_()
        return torch.zeros(like.shape, dtype=like.dtype)

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for name in MOMENTS:
                state[name] = self._host_zeros(p)
        return state

    def _wait_for_copies(self) -> None:
        """Block until every copy back to host memory has landed (before the host reads the moments)."""
        for staging in self._staging.values():
            if staging.copy_out is not None:
                staging.copy_out.synchronize()

    def state_dict(self):
        self._wait_for_copies()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but the moments go straight into host memory (the base
        class would move them to each parameter's device first)."""
        self._wait_for_copies()
        saved = state_dict["state"]
        moments = {key: {n: s[n] for n in MOMENTS if n in s} for key, s in saved.items()}
        super().load_state_dict({**state_dict, "state": {key: {n: v for n, v in s.items() if n not in MOMENTS}
                                                         for key, s in saved.items()}})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for key, p in zip(saved_ids, params):
            for name, value in moments.get(key, {}).items():
                host = self._host_zeros(p)
                host.copy_(value.reshape(p.shape))
                self.state[p][name] = host

    # ---- step ------------------------------------------------------------------------------------------------

    def _staging_for(self, p: torch.Tensor) -> _Staging:
        """The slots for ``p``'s device and dtype, allocated once (again only for a larger chunk)."""
        key = (p.device, p.dtype)
        need = min(self.chunk_numel, p.numel())
        staging = self._staging.get(key)
        if staging is not None and staging.capacity >= need:
            return staging
        cuda = p.device.type == "cuda"
        if staging is not None:  # a larger chunk than before: new slots, the same streams (their order holds)
            streams = (staging.copy_in, staging.copy_out)
        else:
            streams = (torch.cuda.Stream(p.device), torch.cuda.Stream(p.device)) if cuda else (None, None)
        slots = []
        for _ in range(STAGING_SLOTS):
            buffers = [torch.empty(need, dtype=p.dtype, device=p.device) for _ in MOMENTS]
            for buf in buffers if cuda else ():  # freed only after the side streams' work on them
                for stream in streams:
                    buf.record_stream(stream)
            events = [torch.cuda.Event() for _ in range(3)] if cuda else [None] * 3
            slots.append(StagingSlot(*buffers, *events))
        staging = self._staging[key] = _Staging(slots=slots, capacity=need, copy_in=streams[0], copy_out=streams[1])
        return staging

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every parameter with a gradient (the others are skipped, as AdamW skips them)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("HostStateAdamW does not support sparse gradients")
        if not p.is_contiguous():
            raise RuntimeError(f"HostStateAdamW updates parameters through flat views: a {list(p.shape)} parameter "
                               f"is not contiguous")
        state = self._state_of(p)
        state["step"] += 1
        staging = self._staging_for(p)
        param, grad = p.view(-1), p.grad.reshape(-1)
        host = [state[name].view(-1) for name in MOMENTS]
        if staging.copy_in is not None:  # the moments' host memory was last written by the copy-out stream
            staging.copy_in.wait_stream(staging.copy_out)
        for i, start in enumerate(range(0, param.numel(), self.chunk_numel)):
            end = min(start + self.chunk_numel, param.numel())
            self._transfer(ChunkTransfer(param=param[start:end], grad=grad[start:end], host_exp_avg=host[0][start:end],
                                         host_exp_avg_sq=host[1][start:end], slot=staging.slots[i % STAGING_SLOTS]),
                           staging, group, state["step"])

    def _transfer(self, chunk: ChunkTransfer, staging: _Staging, group: dict, step: torch.Tensor) -> None:
        """Copy ``chunk``'s moments in, update, copy them out, each stage ordered after the one it depends on."""
        n = chunk.param.numel()
        slot = chunk.slot
        exp_avg, exp_avg_sq = slot.exp_avg[:n], slot.exp_avg_sq[:n]
        if staging.copy_in is None:
            exp_avg.copy_(chunk.host_exp_avg)
            exp_avg_sq.copy_(chunk.host_exp_avg_sq)
            self._adamw(chunk.param, chunk.grad, exp_avg, exp_avg_sq, group, step)
            chunk.host_exp_avg.copy_(exp_avg)
            chunk.host_exp_avg_sq.copy_(exp_avg_sq)
            return
        compute = torch.cuda.current_stream(chunk.param.device)
        with torch.cuda.stream(staging.copy_in):
            staging.copy_in.wait_event(slot.drained)  # the slot's previous chunk is back on the host
            exp_avg.copy_(chunk.host_exp_avg, non_blocking=True)
            exp_avg_sq.copy_(chunk.host_exp_avg_sq, non_blocking=True)
            slot.loaded.record(staging.copy_in)
        compute.wait_event(slot.loaded)
        self._adamw(chunk.param, chunk.grad, exp_avg, exp_avg_sq, group, step)
        slot.updated.record(compute)
        with torch.cuda.stream(staging.copy_out):
            staging.copy_out.wait_event(slot.updated)
            chunk.host_exp_avg.copy_(exp_avg, non_blocking=True)
            chunk.host_exp_avg_sq.copy_(exp_avg_sq, non_blocking=True)
            slot.drained.record(staging.copy_out)

    def _adamw(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               group: dict, step: torch.Tensor) -> None:
        """AdamW on ``[n]`` views (the step counter already advanced), on the current stream."""
        lr, (beta1, beta2), eps, weight_decay = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        fused = self.fused if self.fused is not None else param.device.type == "cuda"
        if fused:
            device_step = torch.full((), float(step), dtype=torch.float32, device=param.device)
            torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [device_step], amsgrad=False, lr=lr,
                                beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False,
                                grad_scale=None, found_inf=None)
            return
        # torch.optim.adam._single_tensor_adam with decoupled weight decay, operation for operation
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = step.item()
        bias_correction1 = 1 - beta1 ** t
        bias_correction2_sqrt = (1 - beta2 ** t) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


__all__ = ["ChunkTransfer", "HostStateAdamW", "MOMENTS", "STAGING_SLOTS", "StagingSlot"]
