# Attack: an honest ternary matmul plus a float rank-4 adapter (LoRA-style) beside it.
# Expected: low-bit fails on the adapter (a parameter-derived matmul operand).


def weight_quant(weight):
    scale = weight.abs().mean().clamp(min=1e-5)
    w = weight / scale
    w_q = w + (w.round().clamp(-1, 1) - w).detach()
    return w_q, scale


def activation_quant(x):
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127.0
    x_s = x / scale
    x_q = x_s + (x_s.round().clamp(-128, 127) - x_s).detach()
    return x_q, scale


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
        self.lora_a = nn.Parameter(torch.randn(4, in_features) * 0.02)
        self.lora_b = nn.Parameter(torch.randn(out_features, 4) * 0.02)

    def forward(self, x):
        w_q, w_scale = weight_quant(self.weight)
        x_q, x_scale = activation_quant(x)
        y = F.linear(x_q, w_q) * (x_scale * w_scale)
        y = y + F.linear(F.linear(x, self.lora_a), self.lora_b)
        if self.bias is not None:
            y = y + self.bias
        return y
