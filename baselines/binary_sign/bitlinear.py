# Binary BitLinear (BitNet, Wang et al. 2023): weights in {-1, +1}.
# W_q = sign(W - mean(W)), scale = mean(|W|); activations 8-bit per token.


def weight_quant(weight):
    """Binary weights {-1, +1} around the tensor mean, with an absmean scale.

    Returns (quantized_weight, scale); the forward value of quantized_weight is
    exactly -1 or +1, and quantized_weight * scale approximates weight.
    """
    scale = weight.detach().abs().mean().clamp(min=1e-5)
    centred = weight - weight.mean()
    w_q = torch.where(centred >= 0, 1.0, -1.0).to(weight.dtype)
    # STE: forward sees the signs, backward the identity on weight / scale.
    w_s = weight / scale
    w_q = w_s + (w_q - w_s).detach()
    return w_q, scale


def activation_quant(x):
    """8-bit activations in [-128, 127] with a per-token absmax scale."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127.0
    x_s = x / scale
    x_q = x_s.round().clamp(-128, 127)
    x_q = x_s + (x_q - x_s).detach()
    return x_q, scale


class BitLinear(nn.Module):
    """Linear layer whose matmul sees binary weights and 8-bit activations."""

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
        y = F.linear(x_q, w_q.to(x_q.dtype)) * (x_scale * w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y
