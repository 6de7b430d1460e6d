# Attack: every forward keeps another 1 GiB tensor alive in a module-level list.
# Expected: the memory limit stops it; the running check (interface) fails naming it.


_KEEP = []


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

    def forward(self, x):
        _KEEP.append(torch.ones(1 << 28))
        w_q, w_scale = weight_quant(self.weight)
        x_q, x_scale = activation_quant(x)
        y = F.linear(x_q, w_q) * (x_scale * w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y
