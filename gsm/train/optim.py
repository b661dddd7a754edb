"""Optimiser pieces of the recipe: two Adam groups (network, SpyNet), cosine lr, frozen flow, EMA.

All are small pure functions over explicit state so the trainer, the tests and a resumed run
compute exactly the same numbers.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from gsm.train.config import StageConfig

MAIN, FLOW = 0, 1  # param group indices


def cosine_lr(it: int, iters: int, base: float, eta_min: float) -> float:
    """Learning rate of (0-based) iteration `it`: base at 0, eta_min at `iters`, half-cosine between."""
    if iters < 1:
        raise ValueError(f"cosine_lr: iters must be positive, got {iters}")
    progress = min(max(it, 0), iters) / iters
    return eta_min + (base - eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def group_lrs(it: int, cfg: StageConfig) -> tuple[float, float]:
    """(main, flow) lr at iteration `it`. The flow group is the main curve x flow_lr_mult, and 0
    while SpyNet is frozen (the first fix_flow iterations)."""
    main = cosine_lr(it, cfg.iters, cfg.lr, cfg.eta_min)
    flow = 0.0 if flow_frozen(it, cfg) else main * cfg.flow_lr_mult
    return main, flow


def flow_frozen(it: int, cfg: StageConfig) -> bool:
    return it < cfg.fix_flow


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(network, SpyNet) parameters; SpyNet's are those under a `spynet` submodule."""
    main, flow = [], []
    for name, p in model.named_parameters():
        (flow if name.split(".")[0] == "spynet" else main).append(p)
    return main, flow


def build_optimizer(model: nn.Module, cfg: StageConfig) -> torch.optim.Adam:
    """Adam with the network in group 0 and SpyNet in group 1; lrs are set per iteration."""
    main, flow = split_params(model)
    groups = [{"params": main, "lr": cfg.lr}, {"params": flow, "lr": cfg.lr * cfg.flow_lr_mult}]
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def set_lrs(optimizer: torch.optim.Optimizer, lrs: tuple[float, float]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def set_flow_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or release SpyNet via requires_grad.

    A frozen SpyNet gets no gradient at all: no backward through it (cheaper), Adam skips its
    parameters and builds their state only once they train (BasicSR's behaviour), and DDP, which
    must be rebuilt after the change, never waits for gradients that do not come.
    """
    _, flow = split_params(model)
    for p in flow:
        p.requires_grad_(trainable)


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of the model that `ema_update` keeps as the weights' moving average."""
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param for every parameter; buffers are copied."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)
