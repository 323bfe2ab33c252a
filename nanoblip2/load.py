"""
The one strict loader: HF-format safetensors (single file or sharded) -> our modules.

Notable details
- Each model file owns an explicit table {our key template: HF key template}, `{i}` standing for a layer index
  (litgpt style). A value may be `(fn, [HF templates])`: `fn` combines the tensors (fuse q/k/v, fold BERT's
  token-type row into the positions, grow the vocabulary by [DEC], interpolate the position embedding).
- Strict: every tensor of the module comes from the file, every tensor of the file is used or matches the ignore
  list (fnmatch patterns), every shape agrees; else one error lists all the offenders. `fresh` names the keys that
  may keep their initialisation when the file lacks them (BERT has no cross-attention, BertModel no MLM head).
- Lazy: tensors are read one at a time with `safe_open`. Where the file holds the parameter's dtype (on the CPU) the
  parameter takes the file's pages, mapped copy-on-write, as transformers does: no copy, and memory is used only as
  pages are read. Otherwise they are copied into the parameters, which casts them; into a module from `build_empty`,
  memory then peaks at one model plus one tensor (or 64 MB, see `_Reader`).
- Old BERT checkpoints name LayerNorm parameters gamma/beta and prefix keys with `bert.`; `canon` rewrites them.
- Every file loading reads (weights, configs, tokenizers, optimiser state) is read inside `reading(path)`: a truncated
  file, bad JSON or a missing key, our own ValueErrors, a pickle weights_only=True refuses: one CheckpointError.
"""
import contextlib
import fnmatch
import json
import os
import re
import time
from unittest import mock

import torch
from safetensors import safe_open
from tqdm import tqdm


class CheckpointError(ValueError):
    """A model, tokenizer or checkpoint file that cannot be used. The message is one line and starts with its path."""


@contextlib.contextmanager
def reading(path):
    """Any failure to read or use the file or folder `path` in this block -> one CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        if type(e) is ValueError:  # ours, e.g. "model_type 'bert' is not a BLIP-2 or CLIP vision model"
            raise CheckpointError(f"{path}: {e}") from None
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {_gist(e)})") from None


def _gist(e):
    """An error's message in one line: torch.load's and safetensors' run to paragraphs."""
    refused = re.search(r"unsupported GLOBAL \S+", str(e))  # torch.load(weights_only=True): a pickle that runs code
    text = e.strerror if isinstance(e, OSError) and e.strerror else refused[0] if refused else str(e).strip()
    return text.partition("\n")[0].split(". ")[0]


def read_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json, is this a Hugging Face model folder?")
    with reading(path), open(path, encoding="utf-8") as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


def safetensors_files(folder):
    """The weight files of an HF folder: model.safetensors, or the shards named by its index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with reading(index), open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    files = [os.path.join(folder, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(f"{folder}: index names missing shard(s) {', '.join(map(os.path.basename, missing))}")
    return files


def safetensors_keys(files):
    """{tensor name: file} over the files, from their headers (safe_open checks that the file holds all they list)."""
    where = {}
    for f in files:
        with reading(f), safe_open(f, framework="pt") as h:
            where.update(dict.fromkeys(h.keys(), f))
    return where


def match(table, key):
    """Our key -> (its entry in `table`, the HF keys it names with the layer index filled in), or None. An entry is
    an HF template, or (fn, [HF templates]) / (fn, [HF templates], inverse) for tensors that are combined."""
    for ours, entry in [(key, table[key])] if key in table else table.items():
        m = re.fullmatch(re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)"), key)
        if m:
            i, names = m.groupdict().get("i"), [entry] if isinstance(entry, str) else entry[1]
            return entry, [s.format(i=i) if "{i}" in s else s for s in names]
    return None


def prefixed(keys, ours="", hf=""):
    """`load_weights` arguments (table, ignore, fresh, canon) of a part, for a bigger module that holds it under
    `ours` and a bigger file that holds it under `hf` (BLIP-2's vision_model., qformer., language_model.)."""
    put = lambda e: hf + e if isinstance(e, str) else (e[0], [hf + s for s in e[1]], *e[2:])
    canon = keys["canon"]
    if canon and hf:  # the part's own renaming, under the prefix
        canon = lambda k, c=keys["canon"]: hf + c(k.removeprefix(hf)) if k.startswith(hf) else k
    return dict(table={ours + k: put(e) for k, e in keys["table"].items()}, ignore=[hf + p for p in keys["ignore"]],
                fresh=[ours + p for p in keys["fresh"]], canon=canon)


def load_weights(module, folder, table, ignore=(), fresh=(), canon=None):
    """Copy the tensors of an HF checkpoint folder into `module`, strictly. Returns the number of tensors copied."""
    t0 = time.time()
    files = safetensors_files(os.fspath(folder))
    where = {canon(k) if canon else k: (f, k) for k, f in safetensors_keys(files).items()}  # canonical -> (file, key)

    ours = module.state_dict(keep_vars=True)
    plan, missing = {}, []  # plan: our key -> (its table entry, [HF keys])
    for key in ours:
        hit = match(table, key)
        if hit is None or any(s not in where for s in hit[1]):
            if not any(fnmatch.fnmatchcase(key, p) for p in fresh):  # fresh: left at its initialisation
                missing.append(key if hit is None else f"{key} (from {', '.join(s for s in hit[1] if s not in where)})")
            continue
        plan[key] = hit
    used = {s for _, srcs in plan.values() for s in srcs}
    unexpected = [k for k in where if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in ignore)]

    mismatched, n_params, reader, mapped = [], 0, _Reader(), set()
    if not missing and not unexpected:
        with torch.no_grad():
            big = sum(os.path.getsize(f) for f in files) > 1 << 30  # a progress bar for real-size models only
            for key, (entry, srcs) in tqdm(plan.items(), f"loading {type(module).__name__}", unit="tensor",
                                           disable=not big, leave=False):
                tensors = [reader.get(*where[s]) for s in srcs]
                t = tensors[0] if isinstance(entry, str) else entry[0](*tensors)  # entry[0]: the fn combining them
                dst = ours[key]
                if t.shape != dst.shape:
                    mismatched.append(f"{key}: checkpoint {tuple(t.shape)} vs model {tuple(dst.shape)}")
                    continue
                if (isinstance(entry, str) and t.dtype == dst.dtype and dst.device.type == t.device.type == "cpu"
                        and srcs[0] not in mapped):  # a tensor read twice (T5's head saved tied) is copied once
                    dst.data = t  # mapped: the file's pages (the empty storage from build_empty is freed)
                    mapped.add(srcs[0])
                else:
                    dst.copy_(t)
                n_params += t.numel()
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {folder} does not fit {type(module).__name__}:"]
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                lines.append(f"  {len(keys)} {name}: " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    print(f"loaded {type(module).__name__}: {len(plan)} tensors, {n_params / 1e6:.2f}M params "
          f"from {len(files)} file(s) in {time.time() - t0:.1f}s")
    return len(plan)


class _Reader:
    """safe_open maps the file, and pages read stay in RSS until unmapped (a 10 GB file into a 10 GB model: 20 GB peak).
    Reopening it every 64 MB read drops them: the peak is the model plus 64 MB (or its largest tensor)."""

    def __init__(self, budget=64 << 20):
        self.budget, self.file, self.handle, self.read = budget, None, None, 0

    def get(self, file, key):
        with reading(file):
            if file != self.file or self.read > self.budget:
                self.file, self.handle, self.read = file, safe_open(file, framework="pt"), 0
            t = self.handle.get_tensor(key)
        self.read += t.numel() * t.element_size()
        return t


def build_empty(cls, cfg, device="cpu", dtype=None):
    """Instantiate without running any initialisation (meta device), then allocate on `device`. The init functions
    are switched off meanwhile: on meta they do nothing useful, and normal_ there imports torch._dynamo (~2 s)."""
    inits = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_", "constant_")
    skip = lambda t, *args, **kwargs: t
    with mock.patch.multiple(torch.nn.init, **dict.fromkeys(inits, skip)), torch.device("meta"):
        m = cls(cfg) if dtype is None else cls(cfg).to(dtype)
    return m.to_empty(device=device)


def num_params(module):
    return sum(p.numel() for p in module.parameters())
