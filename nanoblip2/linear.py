"""
The language models' linear layers, with a faster CPU path for decoding.

Decoding multiplies a few rows (one per sequence and beam) by every weight matrix of the LM. On the CPU in fp32,
F.linear sends these skinny products to MKL's sgemm, which on this project's AMD EPYC reads the weights 1.6-4x
slower than oneDNN does (one decoding step of OPT-125m at batch 8: its 50272 x 768 head takes 31 ms in F.linear, 14
ms in oneDNN; generation in bench/generate.py, 1.4-1.7x). So, without autograd and for at most ROWS rows, `linear`
calls oneDNN's kernel on the same weights (no copy, no repacking); anything else (training, prefill of long inputs,
the GPU) is F.linear. The sums are taken in another order: results differ from F.linear's in the last bits, and are
as close to an fp64 result.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS = 64  # at 376 rows and more MKL's sgemm was 4-31% faster than oneDNN here (33 rows: 6% slower)
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), through oneDNN for a few rows in fp32 on the CPU without autograd."""
    if (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.numel() <= ROWS * x.size(-1)):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose forward is `linear` above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
