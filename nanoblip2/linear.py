"""
The language models' linear layers, with a faster CPU path for decoding (docs/reference.md, "Decoding through oneDNN").

Decoding multiplies a few rows by every weight matrix. In fp32 on this project's AMD EPYC, F.linear's MKL sgemm reads
the weights of such skinny products 1.6-4x slower than oneDNN (OPT-125m's 50272 x 768 head at batch 8: 31 ms vs 14
ms; generation 1.4-1.7x, bench/generate.py). So, without autograd and for at most ROWS rows, `linear` calls oneDNN on
the same weights (no copy); the sums, taken in another order, differ in the last bits (as close to fp64).

In bf16 F.linear already calls oneDNN, but reorders the weight into oneDNN's blocked layout at every call. `pack`, for
inference, reorders each weight once, in place of the plain one: 1.1-2x faster products at any row count (OPT-2.7B's
2560 x 10240 at 1 row: 1.44 -> 0.76 ms), bit for bit the same sums.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS = 64  # at 376 rows and more MKL's sgemm was 4-31% faster than oneDNN here (33 rows: 6% slower)
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), through oneDNN for a few rows in fp32 on the CPU without autograd, or packed."""
    if weight.is_mkldnn:  # packed by `pack`
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.numel() <= ROWS * x.size(-1)):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose forward is `linear` above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def pack(model):
    """For inference in bf16 on the CPU: every Linear's weight in oneDNN's blocked layout, once, instead of the plain
    tensor (no second copy). The packed model can still generate, but no longer train, save or move. -> model"""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, Linear) and ONEDNN and isinstance(w, nn.Parameter) and w.dtype == torch.bfloat16 \
                and w.device.type == "cpu":
            del m.weight  # from the parameters: the packed tensor is a plain attribute, outside the state dict
            m.weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
    return model
