"""Quantization-aware distillation: the student trained with fake quantization, as the INT8 export will
run it, by the ordinary training loop and loss.

BatchNorm is folded into the convolution first, because the INT8 exporter folds it too: the weights
that get quantized in training are the ones that get quantized in the file. Fake quantization is
torch.ao's (eager mode: modules swapped and hooked, nothing traced), set to the INT8 scheme of
engine.quantize.ort_int8: weights int8 per output channel, symmetric; activations uint8 per tensor, at the
input and after every layer. After training, `QADModel.to_float` writes the folded weights back into the
model's own architecture (each BatchNorm left as the identity plus the folded bias), so the result saves,
loads, evaluates and exports like any other model of its name.

Nothing here traces the model with torch.fx: FX patches torch.nn.Module.__call__ for the whole process while
it traces, which breaks trainings running at the same time in other threads (the flow runs stages in
threads). The pairs to fold are found by one forward pass with hooks on this model's own modules."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

BN = (nn.BatchNorm1d, nn.BatchNorm2d)
CONV = (nn.Conv1d, nn.Conv2d)
FOLD_TOLERANCE = 1e-4  # relative: folding changes only rounding


def batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Conv name -> BatchNorm name, for each BatchNorm whose input is that conv's output."""
    names = {m: n for n, m in model.named_modules()}
    made: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is held so that its id is not reused
    pairs: dict[str, str] = {}

    def conv_out(module, _, out):
        made[id(out)] = (names[module], out)

    def bn_in(module, args):
        if id(args[0]) in made:
            pairs[made[id(args[0])][0]] = names[module]

    hooks = [m.register_forward_hook(conv_out) for m in model.modules() if isinstance(m, CONV)]
    hooks += [m.register_forward_pre_hook(bn_in) for m in model.modules() if isinstance(m, BN)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return pairs


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, dict[str, str]]:
    """A copy of the model with each BatchNorm that directly follows a conv folded into it (and left as
    nn.Identity); and those pairs. A fold that changes the model's output is refused."""
    model = copy.deepcopy(model).eval()
    pairs = batchnorm_pairs(model, example)
    folded = copy.deepcopy(model)
    for conv, bn in pairs.items():
        _replace(folded, conv, fuse_conv_bn_eval(folded.get_submodule(conv), folded.get_submodule(bn)))
        _replace(folded, bn, nn.Identity())
    with torch.no_grad():
        want, got = model(example), folded(example)
    if (got - want).abs().max() > FOLD_TOLERANCE * (1 + want.abs().max()):
        raise ValueError(f"folding BatchNorm into {', '.join(pairs)} changes the output of {getattr(model, 'arch', 'the model')}: "
                         "a conv output feeds more than its BatchNorm")
    return folded, pairs


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def qconfig():
    """torch.ao fake quantization in the INT8 scheme the exporters use (see the module's docstring)."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, QConfig
    from torch.ao.quantization.observer import MovingAveragePerChannelMinMaxObserver

    activation = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfig(activation=activation, weight=weight)


class QADModel(nn.Module):
    """The student with BatchNorm folded and fake quantization inserted; trains like any model."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        super().__init__()
        from torch.ao.quantization import prepare_qat

        folded, self.pairs = fold_batchnorm(model, example)
        folded.qconfig = qconfig()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
            self.qat = prepare_qat(folded.train(), inplace=False)
        self.input_quant = folded.qconfig.activation().to(example.device)  # the file quantizes its input too
        self._original = [copy.deepcopy(model)]  # in a list: not a submodule, so not in state_dict or parameters
        self.arch = getattr(model, "arch", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qat(self.input_quant(x))

    def train(self, mode: bool = True) -> "QADModel":
        """Ranges are observed in training only: validation images never move them."""
        from torch.ao.quantization import disable_observer, enable_observer

        super().train(mode)
        self.apply(enable_observer if mode else disable_observer)
        return self

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        """The trained weights in the original architecture (fp32, no fake quantization)."""
        model = copy.deepcopy(self._original[0])
        own, trained = model.state_dict(), self.qat.state_dict()
        for key, value in own.items():  # every tensor both hold by name: weights, and any BatchNorm left unfolded
            if key in trained and trained[key].shape == value.shape:
                value.copy_(trained[key])
        modules = dict(model.named_modules())
        for conv, bn in self.pairs.items():
            _identity_bn(modules[bn], modules[conv], self.qat.get_submodule(conv).bias)
        return model


def _identity_bn(bn: nn.Module, conv: nn.Module, bias: torch.Tensor) -> None:
    """BatchNorm that passes its input through and adds the folded bias: var 1 - eps, so that the
    normaliser sqrt(var + eps) is 1."""
    bn.weight.fill_(1.0)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    if conv.bias is not None:
        conv.bias.copy_(bias)
        bn.bias.zero_()
    else:
        bn.bias.copy_(bias)
