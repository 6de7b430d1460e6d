# As ternary_dequant_operands, but the straight-through estimator is applied to the
# dequantized values (x + (dequant(x) - x).detach(), BitNet's published training recipe): the
# backward pass then has no elementwise work for the quantizers at all, only the matmuls.


def weight_quant(weight):
    scale = weight.detach().abs().mean().clamp(min=1e-5)
    w = weight / scale
    w_q = w.round().clamp(-1, 1)
    w_q = w + (w_q - w).detach()
    return w_q, scale


def activation_quant(x):
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127.0
    x_s = x / scale
    x_q = x_s.round().clamp(-128, 127)
    x_q = x_s + (x_q - x_s).detach()
    return x_q, scale


def straight_through(latent, forward_value):
    """forward_value in the forward pass, the identity on latent in the backward pass."""
    return latent + (forward_value - latent).detach()


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
        w_q, w_scale = weight_quant(self.weight.detach())
        x_q, x_scale = activation_quant(x.detach())
        w = straight_through(self.weight, w_q * w_scale)
        x = straight_through(x, x_q * x_scale)
        return F.linear(x, w, self.bias)
