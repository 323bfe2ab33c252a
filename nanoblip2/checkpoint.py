"""
Our own checkpoints: a folder with config.json (model and training config, frozen parts' sources and fingerprints),
model.safetensors (trainable tensors only), meta.json (step, metrics), optim.pt (optimiser and random states).

Notable details
- The folder a script names (out/stage1/ckpt) is a symlink to the folder of the last save (ckpt.saved-XXXX beside
  it). A save writes a new folder, then points the name at it with one os.replace of a new symlink: killed at any
  moment, the name is the old checkpoint or the new one, whole. Folders written by older code are real folders:
  they load as they are, and the first save replaces one with the symlink in one renameat2(RENAME_EXCHANGE).
"""
import ctypes
import glob
import hashlib
import json
import os
import shutil
import tempfile

import torch

from .hub import resolve
from .load import CheckpointError, safetensors_files


def save_checkpoint(folder, tensors, config, meta, optim_state=None):
    """Write a new folder beside `folder` and make `folder` a symlink to it; then delete the folder it replaces and
    whatever an earlier, interrupted save left."""
    from safetensors.torch import save_file
    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(prefix=f"{name}.saved-", dir=parent)
    os.chmod(new, 0o755)  # mkdtemp's is 0o700
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(new, "model.safetensors"),
              metadata={"format": "pt"})
    for file, obj in (("config.json", config), ("meta.json", meta)):
        with open(os.path.join(new, file), "w") as f:
            json.dump(obj, f, indent=2)
    if optim_state is not None:
        torch.save(optim_state, os.path.join(new, "optim.pt"))
    link = new + ".link"
    os.symlink(os.path.basename(new), link)  # relative: the run's folder can be moved
    if os.path.isdir(folder) and not os.path.islink(folder):  # a real folder, from older code
        _exchange(link, folder)
    else:
        os.replace(link, folder)  # the one step that switches the checkpoint
    stale = glob.glob(glob.escape(os.path.join(parent, name)) + ".saved-*") + [folder + ".tmp", folder + ".old"]
    for path in stale:  # the folder replaced, and those of saves cut short (older code's .tmp and .old)
        if os.path.islink(path):
            os.remove(path)
        elif os.path.isdir(path) and path != new:
            shutil.rmtree(path)


def _exchange(a, b):
    """Swap the names a and b in one step (Linux's renameat2 RENAME_EXCHANGE). Where the system or the file system
    has no such call: two renames, with a moment between them where b is missing."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2 is None or renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        os.rename(b, a + ".old")
        os.replace(a, b)


def fingerprint(folder):
    """A cheap identity of a folder's weights: SHA-256 over each safetensors file's size and 17 evenly spaced 64 KiB
    samples (header included), a few ms for any size. Our checkpoints name their frozen parts by path: this notices
    files replaced since training (a rerun of data/shapes/prepare.py), which would load and give garbage silently."""
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
    """The checkpoint to resume from: `folder`, or `folder.old` where older code's save was cut between its renames."""
    for f in (folder, folder + ".old"):
        if os.path.isfile(os.path.join(f, "model.safetensors")):
            return f
    raise CheckpointError(f"{folder}: no checkpoint to resume from")
