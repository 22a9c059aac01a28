"""Quantization-aware distillation: the student trained with fake quantization, as the INT8 export will
run it, by the ordinary training loop and loss.

BatchNorm is folded into the convolution first, because the INT8 exporter folds it too: the weights
that get quantized in training are the ones that get quantized in the file. Fake quantization is torch's
own operators (torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine: gradients pass
straight through), with moving-average min/max ranges, in the INT8 scheme of engine.quantize.ort_int8: weights
int8 per output channel, symmetric; activations uint8 per tensor, at the input and after every conv, linear and
unfolded BatchNorm layer. (torch.ao.quantization, which placed these until now, is deprecated in torch 2.14 in favour of torchao;
what it did for this is the forty lines below, so we depend on neither.) After training, `QADModel.to_float` writes the folded weights back into the
model's own architecture (each BatchNorm left as the identity plus the folded bias), so the result saves,
loads, evaluates and exports like any other model of its name.

Nothing here traces the model with torch.fx: FX patches torch.nn.Module.__call__ for the whole process while
it traces, which breaks trainings running at the same time in other threads (the flow runs stages in
threads). The pairs to fold are found by one forward pass with hooks on this model's own modules."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
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


class FakeQuant(nn.Module):
    """Rounds to the INT8 grid in the forward pass and passes gradients straight through. Its range is a moving
    average of the min and max it sees while observing (the first batch sets it), as torch.ao's
    MovingAverage(PerChannel)MinMaxObserver kept it; scale and zero point follow from the range as there."""

    AVERAGING = 0.01

    def __init__(self, quant_min: int, quant_max: int, channel_axis: int | None = None):
        super().__init__()
        self.quant_min, self.quant_max, self.channel_axis = quant_min, quant_max, channel_axis
        self.observing = True
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    @classmethod
    def activation(cls) -> "FakeQuant":
        return cls(0, 255)  # uint8, per tensor, affine

    @classmethod
    def weight(cls) -> "FakeQuant":
        return cls(-127, 127, channel_axis=0)  # int8, per output channel, symmetric

    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.channel_axis is None:
            low, high = torch.aminmax(x)
        else:
            low, high = torch.aminmax(x.transpose(0, self.channel_axis).flatten(1), dim=1)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = low.clone().reshape(-1), high.clone().reshape(-1)
        else:
            self.min_val += self.AVERAGING * (low - self.min_val)
            self.max_val += self.AVERAGING * (high - self.max_val)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A saved range has the size it had when saved (empty before the first batch, else one or a channel's
        worth): the buffers take that size before they are filled, as torch.ao's observers did."""
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.min_val.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
        if self.min_val.numel() == 0:  # nothing observed yet: nothing to round to
            return x
        eps = torch.finfo(torch.float32).eps
        low, high = self.min_val.clamp(max=0), self.max_val.clamp(min=0)
        if self.channel_axis is None:
            scale = ((high - low) / (self.quant_max - self.quant_min)).clamp(min=eps)
            zero = (self.quant_min - torch.round(low / scale)).clamp(self.quant_min, self.quant_max).int()
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, self.quant_min, self.quant_max)
        scale = (torch.max(-low, high) / ((self.quant_max - self.quant_min) / 2)).clamp(min=eps)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale, zero, self.channel_axis, self.quant_min,
                                                      self.quant_max)


class _QuantizedConv1d(nn.Conv1d):
    def forward(self, x):
        return self.output_quant(self._conv_forward(x, self.weight_quant(self.weight), self.bias))


class _QuantizedConv2d(nn.Conv2d):
    def forward(self, x):
        return self.output_quant(self._conv_forward(x, self.weight_quant(self.weight), self.bias))


class _QuantizedLinear(nn.Linear):
    def forward(self, x):
        return self.output_quant(F.linear(x, self.weight_quant(self.weight), self.bias))


class _QuantizedBatchNorm1d(nn.BatchNorm1d):
    def forward(self, x):
        return self.output_quant(super().forward(x))


class _QuantizedBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        return self.output_quant(super().forward(x))


WEIGHTED = {nn.Conv1d: _QuantizedConv1d, nn.Conv2d: _QuantizedConv2d, nn.Linear: _QuantizedLinear}
OUTPUT_ONLY = {nn.BatchNorm1d: _QuantizedBatchNorm1d, nn.BatchNorm2d: _QuantizedBatchNorm2d}  # one left unfolded


def insert_fake_quant(model: nn.Module) -> nn.Module:
    """Each conv and linear layer (of exactly those types, as the exporters see them) rounds its weight and its
    output; a BatchNorm left unfolded rounds its output. A layer keeps its object, parameters and state_dict
    names: only its class changes, to one whose forward adds the rounding, so the trained weights copy back into
    the original architecture by name. This places rounding where torch.ao's eager prepare_qat placed it."""
    for module in list(model.modules()):
        kind = type(module)
        if kind in WEIGHTED:
            module.weight_quant = FakeQuant.weight().to(module.weight.device)
        if kind in WEIGHTED or kind in OUTPUT_ONLY:
            module.output_quant = FakeQuant.activation().to(next(module.buffers(), module.weight).device)
            module.__class__ = WEIGHTED.get(kind) or OUTPUT_ONLY[kind]
    return model


class QADModel(nn.Module):
    """The student with BatchNorm folded and fake quantization inserted; trains like any model."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        super().__init__()
        folded, self.pairs = fold_batchnorm(model, example)
        self.qat = insert_fake_quant(folded.train())
        self.input_quant = FakeQuant.activation().to(example.device)  # the file quantizes its input too
        self._original = [copy.deepcopy(model)]  # in a list: not a submodule, so not in state_dict or parameters
        self.arch = getattr(model, "arch", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qat(self.input_quant(x))

    def train(self, mode: bool = True) -> "QADModel":
        """Ranges are observed in training only: validation images never move them."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, FakeQuant):
                m.observing = mode
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
