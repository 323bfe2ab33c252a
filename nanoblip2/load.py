"""
The one strict loader: HF-format safetensors (single file or sharded) -> our modules.

Notable details
- Each model file owns an explicit table {our key template: HF key template}, with `{i}` standing for a layer
  index (litgpt style). A value may also be `(fn, [HF templates])`: the tensors are read and combined by `fn`
  (fuse q/k/v, fold BERT's token-type row into the positions, grow the vocabulary by [DEC], interpolate the
  position embedding to a new image size).
- Strict: every tensor of the module must come from the file, every tensor in the file must be used or match
  the ignore list (fnmatch patterns), and every shape must agree. Otherwise one error lists all the offenders.
  Keys that may keep their fresh initialisation when the file lacks them (BERT has no cross-attention, a plain
  BertModel no MLM head) are named in `fresh`.
- Lazy: files are opened with `safe_open` and tensors are read one at a time and copied straight into the
  parameters, which casts them to the parameters' dtype. Build the module on the meta device and `to_empty` it
  first and peak memory stays at one model plus one tensor.
- Old BERT checkpoints name LayerNorm parameters gamma/beta and prefix keys with `bert.`; `canon` rewrites
  file keys before matching.
"""
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    pass


def read_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json, is this a Hugging Face model folder?")
    with open(path) as f:
        return json.load(f)


def safetensors_files(folder):
    """The weight files of an HF folder: model.safetensors, or the shards named by its index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
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


def _template_regex(template):
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _resolve(table, key):
    """Our key -> (fn or None, [HF keys]) using the first matching template, or None if no template matches."""
    if isinstance(table.get(key), str):
        return None, [table[key]]
    for ours, src in table.items():
        m = _template_regex(ours).match(key)
        if m:
            fn, srcs = (None, [src]) if isinstance(src, str) else src
            return fn, [s.format(i=m.group("i")) if "{i}" in s else s for s in srcs]
    return None


def load_weights(module, folder_or_files, table, ignore=(), fresh=(), canon=None, verbose=True):
    """Copy the tensors of an HF checkpoint into `module`, strictly. Returns the number of tensors copied."""
    t0 = time.time()
    if isinstance(folder_or_files, (str, os.PathLike)):
        files = safetensors_files(os.fspath(folder_or_files))
    else:
        files = list(folder_or_files)
    where = {}  # canonical file key -> (file, original key)
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                where[canon(k) if canon else k] = (f, k)

    ours = dict(module.state_dict(keep_vars=True))
    plan, missing, used = {}, [], set()
    for key in ours:
        hit = _resolve(table, key)
        if hit is None or any(s not in where for s in hit[1]):
            if any(fnmatch.fnmatchcase(key, p) for p in fresh):
                continue  # deliberately left at its initialisation
            missing.append(key if hit is None else f"{key} (from {', '.join(s for s in hit[1] if s not in where)})")
            continue
        plan[key] = hit
        used.update(hit[1])
    unexpected = [k for k in where if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in ignore)]

    mismatched, n_params, reader = [], 0, _Reader()
    if not missing and not unexpected:
        with torch.no_grad():
            for key, (fn, srcs) in plan.items():
                tensors = [reader.get(*where[s]) for s in srcs]
                t = fn(*tensors) if fn else tensors[0]
                dst = ours[key]
                if t.shape != dst.shape:
                    mismatched.append(f"{key}: checkpoint {tuple(t.shape)} vs model {tuple(dst.shape)}")
                    continue
                dst.copy_(t)
                n_params += t.numel()
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {folder_or_files} does not fit {type(module).__name__}:"]
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                lines.append(f"  {len(keys)} {name}: " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    if verbose:
        print(f"loaded {type(module).__name__}: {len(plan)} tensors, {n_params / 1e6:.2f}M params "
              f"from {len(files)} file(s) in {time.time() - t0:.1f}s")
    return len(plan)


class _Reader:
    """safetensors maps the file into memory, and every page read stays in this process's RSS until it is unmapped:
    read a 10 GB file into a 10 GB model and the peak is 20 GB. So the file is reopened every 64 MB read, which
    drops the pages read so far, and the peak stays at the model plus 64 MB (or its largest tensor)."""

    def __init__(self, budget=64 << 20):
        self.budget, self.file, self.handle, self.read = budget, None, None, 0

    def get(self, file, key):
        if file != self.file or self.read > self.budget:
            self.file, self.handle, self.read = file, safe_open(file, framework="pt"), 0
        t = self.handle.get_tensor(key)
        self.read += t.numel() * t.element_size()
        return t


def build_empty(cls, cfg, device="cpu", dtype=None):
    """Instantiate without running any initialisation (meta device), then allocate on `device`. The init functions
    are switched off meanwhile: on meta they do nothing useful, and normal_ there imports torch._dynamo (~2 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *args, **kwargs: t)
        with torch.device("meta"):
            m = cls(cfg) if dtype is None else cls(cfg).to(dtype)
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)
    return m.to_empty(device=device)


# ----------------------------------------------------------------------------------------------------------------------
# The Hub: a Hub id (org/name) -> a local folder, from the HF cache if complete there, else downloaded into it.
# Notable details
# - The cache is huggingface_hub's: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub, laid out as
#   models--org--name/refs/<revision> (holding a commit hash) and models--org--name/snapshots/<commit>/<file>. Its
#   files may be symlinks into blobs/ (isfile and open follow them); ours are plain files, which it reads as well.
# - A snapshot counts when it has config.json and all its weights (safetensors_files); then no request is made.
# - Downloads use urllib from $HF_ENDPOINT/{repo}/resolve/{revision}/{file}, never *.bin. The commit is config.json's
#   X-Repo-Commit header (a small git file, answered directly rather than redirected to the CDN). Optional files
#   answering 404 are absent. A file already in the snapshot was complete when renamed there: it is not fetched again.
# - Each file streams into <file>.<pid>.incomplete beside its final name (so concurrent ranks do not collide) and is
#   renamed only once it has the announced Content-Length: an interrupted download never leaves a truncated file.
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

OPTIONAL_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "generation_config.json",
                  "preprocessor_config.json", "processor_config.json"]


class HubError(OSError):
    pass


def hub_cache():
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def _complete(snapshot):
    try:
        return os.path.isfile(os.path.join(snapshot, "config.json")) and bool(safetensors_files(snapshot))
    except (CheckpointError, ValueError, KeyError):  # no weights, a missing shard, an unreadable index
        return False


def _save(resp, path, url):
    """Stream an open response into `path` through a temporary file, renamed once all announced bytes are in."""
    tmp, total = f"{path}.{os.getpid()}.incomplete", int(resp.headers.get("Content-Length") or 0) or None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path))
    try:
        with resp, bar, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                bar.update(f.write(chunk))
        if total is not None and os.path.getsize(tmp) != total:
            raise HubError(f"download of {url} interrupted: got {os.path.getsize(tmp)} of {total} bytes")
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C: never leave the temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and not isinstance(e, HubError):
            raise HubError(f"download of {url} failed: {e!r}") from None
        raise


def resolve(src, revision="main"):
    """A local folder for `src`: an existing folder as is, or a Hub id from the HF cache or downloaded into it."""
    if os.path.isdir(src):
        return os.fspath(src)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        raise HubError(f"{src}: not a folder, and not a Hub id like Salesforce/blip2-opt-2.7b")
    repo_dir = os.path.join(hub_cache(), "models--" + src.replace("/", "--"))
    ref, is_commit, commit = os.path.join(repo_dir, "refs", revision), re.fullmatch(r"[0-9a-f]{40}", revision), revision
    if not is_commit and os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    if _complete(os.path.join(repo_dir, "snapshots", commit)):
        return os.path.join(repo_dir, "snapshots", commit)

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    base = f"{endpoint}/{src}/resolve/{urllib.parse.quote(revision, safe='')}/"
    try:
        try:
            resp = urllib.request.urlopen(base + "config.json", timeout=30)
        except urllib.error.HTTPError as e:
            if e.code not in (401, 403, 404):
                raise
            raise HubError(f"{src}: no such local folder, and repo or revision '{revision}' not found on {endpoint} "
                           f"(or it is gated or private: HTTP {e.code} for config.json)") from None
        commit = resp.headers.get("X-Repo-Commit") or revision
        snapshot = os.path.join(repo_dir, "snapshots", commit)
        os.makedirs(snapshot, exist_ok=True)
        _save(resp, os.path.join(snapshot, "config.json"), base + "config.json")

        def get(name, optional=True):  # fetch a file unless the snapshot has it; False when an optional one is absent
            if not os.path.isfile(os.path.join(snapshot, name)):
                try:
                    _save(urllib.request.urlopen(base + name, timeout=30), os.path.join(snapshot, name), base + name)
                except urllib.error.HTTPError as e:
                    if e.code == 404 and optional:
                        return False
                    raise HubError(f"{base + name}: HTTP {e.code} {e.reason}") from None
            return True

        if get("model.safetensors.index.json"):
            with open(os.path.join(snapshot, "model.safetensors.index.json")) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        else:
            shards = ["model.safetensors"]
        for name in shards + OPTIONAL_FILES:
            get(name, optional=name in OPTIONAL_FILES)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:  # refused, DNS, timeout, server error
        raise HubError(f"cannot download {src} from {endpoint} ({getattr(e, 'reason', e)}); no complete copy in the HF "
                       f"cache at {repo_dir}. Pass a local folder instead.") from None
    if not is_commit:
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        with open(ref, "w") as f:
            f.write(commit)
    return snapshot


# ---------------------------------------------------------------------------------------------------------
# Our own checkpoints (SPEC §10): a folder with config.json (model + training config, and the sources of the
# frozen parts), model.safetensors (the trainable tensors only), meta.json (step, metrics) and optim.pt.


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
