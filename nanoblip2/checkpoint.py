"""
Our own checkpoints: a folder with config.json (model + training config, the sources of the frozen parts and a
fingerprint of their weights), model.safetensors (the trainable tensors only), meta.json (step, metrics) and
optim.pt (optimiser and random states, for an exact resume).
"""
import hashlib
import json
import os
import shutil

import torch

from .hub import resolve
from .load import CheckpointError, safetensors_files


def save_checkpoint(folder, tensors, config, meta, optim_state=None):
    """Write the folder atomically: into `folder.tmp`, then swapped in, so that a crash never loses the last one."""
    from safetensors.torch import save_file
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    for name, obj in (("config.json", config), ("meta.json", meta)):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2)
    if optim_state is not None:
        torch.save(optim_state, os.path.join(tmp, "optim.pt"))
    if os.path.isdir(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def fingerprint(folder):
    """A cheap identity of a folder's weights: SHA-256 over each safetensors file's size and 17 evenly spaced 64 KiB
    samples (the header included), a few ms for any size. Our checkpoints name their frozen parts by path; this
    notices when the files there were replaced since training (a rerun of data/shapes/prepare.py, another
    download), which would otherwise load and give garbage without a word."""
    h = hashlib.sha256()
    for path in safetensors_files(folder):
        size = os.path.getsize(path)
        h.update(size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for k in range(17):
                f.seek(k * max(0, size - 65536) // 16)
                h.update(f.read(65536))
    return h.hexdigest()[:16]


def check_frozen(folder, d):
    """Raise if a frozen part named in our checkpoint's config `d` is not the one it was trained with."""
    for name, want in d.get("fingerprints", {}).items():
        src = d["frozen"][name]
        if fingerprint(resolve(src)) != want:
            raise CheckpointError(f"{folder}: its frozen {name} {src} has changed since this checkpoint was trained "
                                  f"(fingerprint {want}); restore those weights or train again")


def checkpoint_folder(folder):
    """The checkpoint to resume from: `folder`, or `folder.old` if a crash came between the two renames above."""
    for f in (folder, folder + ".old"):
        if os.path.isfile(os.path.join(f, "model.safetensors")):
            return f
    raise CheckpointError(f"{folder}: no checkpoint to resume from")
