"""sample.py --attention: the queries' cross-attention weights from the hooks against a recomputation without hooks,
the picture's layout and orientation, and the end-to-end run on a tiny BLIP-2 folder."""
import math
import sys

import pytest
import torch
from PIL import Image

from conftest import pixels
from nanoblip2 import Blip2
from test_sample import ROOT, images, run  # noqa: F401 (images is a fixture)

sys.path.insert(0, ROOT)
from sample import SampleConfig, attention_picture, cross_attention, main  # noqa: E402


def test_weights_match_a_recomputation(blip2_opt):
    model = Blip2.from_pretrained(blip2_opt[0])
    x = pixels(B=2)
    got = cross_attention(model, x)                                         # (B, Q, N)
    assert got.shape == (2, 5, 17)                                          # 5 queries, 4 x 4 patches + [CLS]
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 5))
    # by hand: the query pass layer by layer, the cross-attention softmax written out where a layer has one
    qf = model.qformer
    with torch.no_grad():
        image = model.image_embeds(x)                                       # (B, N, Cv)
        h = qf.ln_embed(model.query_tokens.expand(2, -1, -1))               # (B, Q, C)
        maps = []
        for layer in qf.layers:
            if layer.cross is not None:
                a, _ = layer.attn(h)
                H, C = layer.cross.heads, h.size(-1)
                q = layer.cross.query(a).unflatten(-1, (H, C // H))         # (B, Q, H, C/H)
                k = layer.cross.key(image).unflatten(-1, (H, C // H))       # (B, N, H, C/H)
                maps.append(torch.einsum("bqhd,bnhd->bhqn", q, k).div(math.sqrt(C // H)).softmax(-1).mean(1))
            h, _ = layer(h, h.size(1), image, None, None)
    assert len(maps) == 2                                                   # layers 0 and 2 of 4
    torch.testing.assert_close(got, torch.stack(maps).mean(0))
    assert not torch.allclose(maps[0], maps[1], atol=1e-3)                  # so the layer average matters
    assert (got[:, 1:] - got[:, :1]).abs().amax() > 1e-3                    # and the queries look at different places
    assert all(not m._forward_hooks for m in model.modules())               # the hooks are gone


def panel(picture, i, size, cols, margin):
    x, y = margin + (i % cols) * (size + margin), margin + (i // cols) * (size + margin)
    return picture.crop((x, y, x + size, y + size))


def test_picture_layout_and_orientation():
    grid, Q, size, cols, margin = 3, 9, 60, 4, 2
    weights = torch.eye(Q) + 0.01                                           # query i looks at patch i (row-major)
    img = Image.new("RGB", (50, 20), (90, 120, 150))
    pic = attention_picture(img, weights, grid, size=size, cols=cols, margin=margin)
    assert pic.size == (4 * size + 5 * margin, 3 * size + 4 * margin)      # 1 + 9 panels: 4 columns, 3 rows
    assert panel(pic, 0, size, cols, margin).getpixel((size // 2, size // 2)) == (90, 120, 150)
    assert pic.getpixel((0, 0)) == pic.getpixel((size + margin + 1, size + margin + 1)) == (255, 255, 255)  # margins
    for i in range(Q):
        lum = torch.tensor(panel(pic, i + 1, size, cols, margin).convert("L").getdata(), dtype=torch.float)
        cells = lum.view(grid, size // grid, grid, size // grid).mean((1, 3))  # (grid, grid) mean brightness
        assert cells.argmax() == i, (i, cells)                                # the hottest cell is patch i


def test_attention_end_to_end(blip2_opt, images, tmp_path):
    out = tmp_path / "att.png"
    code, stdout, err = run(f"--init_from={blip2_opt[0]}", f"--image={images / 'red.png'}", f"--attention={out}",
                            "--max_new_tokens=3", "--num_beams=1")
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[-2].startswith(str(images / "red.png") + ": ") and lines[-1] == f"wrote {out} (5 query panels)"
    pic = Image.open(out)
    assert pic.format == "PNG"
    size, margin = 160, 4                                                   # attention_picture's defaults
    assert pic.size == (6 * size + 7 * margin, size + 2 * margin)          # 1 + 5 panels in one row
    panels = [panel(pic, i, size, 8, margin).tobytes() for i in range(6)]
    assert len(set(panels)) == 6                                            # the image and 5 different heat maps


def test_attention_errors(blip2_opt, images, tmp_path):
    code, out, err = run(f"--init_from={blip2_opt[0]}", f"--image={images}", f"--attention={tmp_path / 'a.png'}")
    assert code != 0 and len(err.strip().splitlines()) == 1 and err.startswith("error: --attention "), err
    # the other refusals, in-process (they come before the model load)
    for cfg, msg in [(SampleConfig(attention="a.png"), "error: --attention "),
                     (SampleConfig(caption_ann="x.json", attention="a.png"), "python eval.py --caption_ann=x.json"),
                     (SampleConfig(image="x.png", attention=str(tmp_path / "nowhere" / "a.png")), "nowhere")]:
        with pytest.raises(SystemExit) as e:
            main(cfg)
        assert msg in str(e.value) and len(str(e.value).splitlines()) == 1, e.value
    assert not list(tmp_path.iterdir())
