"""The same seed gives the same weights bit for bit, wherever the buffers lie in memory: no op in a training step may
sum in an order that depends on alignment or threads (the ITM negatives' indexing did: its backward, index_put with
accumulate, added repeated rows in an alignment-dependent order on the CPU)."""
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = """
import hashlib, sys, torch
_ = torch.empty(int(sys.argv[1]))  # moves every later buffer
from nanoblip2 import qformer as qf, vit as vt
from nanoblip2.stage1 import Blip2Stage1, Stage1Config
from nanoblip2.training import NegativePool
torch.manual_seed(0)
vit = vt.ViTConfig(image_size=64, patch_size=8, width=192, depth=4, heads=3, mlp=768, source_image_size=64)
q = qf.QFormerConfig(width=192, depth=4, heads=3, mlp=768, vision_width=192, num_query_tokens=16, vocab_size=300)
model = Blip2Stage1(Stage1Config(vit=vit, qformer=q, dec_id=299)).train()
model.vit.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
opt, pool, g = torch.optim.AdamW(params, lr=1e-3), NegativePool(64), torch.Generator().manual_seed(0)
data = torch.Generator().manual_seed(1)
for step in range(int(sys.argv[2])):
    px = torch.randn(32, 3, 64, 64, generator=data)
    ids = torch.randint(1, 299, (32, 12), generator=data)
    ids[:, 0] = 101
    out = model(px, ids, torch.ones_like(ids), g, torch.arange(32) + 32 * step, pool.items)
    out["loss"].backward()
    pool.push(**out["samples"])
    opt.step()
    opt.zero_grad()
print(hashlib.md5(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest())
"""


def test_stage1_steps_are_bit_for_bit_reproducible():
    run = lambda offset: subprocess.run([sys.executable, "-c", STEPS, str(offset), "10"], cwd=ROOT, text=True,
                                        capture_output=True, timeout=300, check=True).stdout.strip()
    hashes = [run(offset) for offset in (1, 7, 13)]
    assert len(set(hashes)) == 1, hashes
