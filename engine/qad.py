"""Quantization-aware distillation: the student trained with fake quantization, as the INT8 export will
run it, by the ordinary training loop and loss.

BatchNorm is folded into the convolution first, because the INT8 exporter folds it too: the weights
that get quantized in training are the ones that get quantized in the file. Fake quantization is
torch.ao's (FX graph mode), set to the INT8 scheme of engine.quantize.ort_int8: weights int8 per output
channel, symmetric; activations uint8 per tensor. After training, `QADModel.to_float` writes the folded
weights back into the model's own architecture (each BatchNorm left as the identity plus the folded
bias), so the result saves, loads, evaluates and exports like any other model of its name."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_batchnorm(model: nn.Module) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """The model traced with every BatchNorm that directly follows a conv (or linear) layer folded into it;
    and those pairs, conv name -> BatchNorm name."""
    traced = torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    modules = dict(traced.named_modules())
    pairs = {}
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], BN):
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and isinstance(modules[prev.target], (nn.Conv1d, nn.Conv2d))):
            continue
        fused = fuse_conv_bn_eval(modules[prev.target], modules[node.target])
        parent, _, leaf = prev.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, leaf, fused)
        node.replace_all_uses_with(prev)
        traced.graph.erase_node(node)
        pairs[prev.target] = node.target
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, pairs


def qconfig_mapping():
    """torch.ao fake quantization in the INT8 scheme the exporters use (see the module's docstring)."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, QConfig, QConfigMapping
    from torch.ao.quantization.observer import MovingAveragePerChannelMinMaxObserver

    activation = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


class QADModel(nn.Module):
    """The student with BatchNorm folded and fake quantization inserted; trains like any model."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        super().__init__()
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        folded, self.pairs = fold_batchnorm(model)
        device = next(model.parameters()).device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
            self.qat = prepare_qat_fx(folded.train().cpu(), qconfig_mapping(), (example.cpu(),)).to(device)
        self._original = [copy.deepcopy(model)]  # in a list: not a submodule, so not in state_dict or parameters
        self.arch = getattr(model, "arch", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qat(x)

    def train(self, mode: bool = True) -> "QADModel":
        """Ranges are observed in training only: validation images never move them."""
        from torch.ao.quantization import disable_observer, enable_observer

        super().train(mode)
        self.qat.apply(enable_observer if mode else disable_observer)
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
