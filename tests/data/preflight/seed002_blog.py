# The blog's (seed 002) weight_quant and activation_quant in the template's BitLinear,
# verbatim but for the parameter name the interface requires (weight, not w). Its
# activation_quant returns one Tensor, not (quantized_x, scale): the template's
# `x_q, x_scale = activation_quant(x)` then silently unpacks the batch dimension.
# Expected: interface fails, saying activation_quant returns a Tensor.
from torch import Tensor


def weight_quant(weight: Tensor) -> tuple[Tensor, Tensor]:
    w = weight
    scale: Tensor = 1.0 / w.abs().mean().clamp(min=1e-5)
    quant: Tensor = (w * scale).round().clamp(-1, 1) / scale
    w_quant: Tensor = w + (quant - w).detach()
    scale = abs(w_quant).max().detach()
    w_quant = w_quant / scale
    return w_quant, scale


def activation_quant(x: Tensor) -> Tensor:
    scale: Tensor = 127.0 / x.abs().max(dim=1, keepdim=True).values.clamp(min=1e-5)
    y: Tensor = (x * scale).round().clamp(-128, 127) / scale
    return x + (y - x).detach()


class BitLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x):
        w_q, w_scale = weight_quant(self.weight)
        x_q, x_scale = activation_quant(x)
        y = F.linear(x_q, w_q.to(x_q.dtype))
        y = y * (x_scale * w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y
