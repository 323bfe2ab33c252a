"""
The Hub: a Hub id (org/name) -> a local folder, from the HF cache if complete there, else downloaded into it.

Notable details
- The cache is huggingface_hub's: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub, laid out as
  models--org--name/refs/<revision> (a commit hash) and models--org--name/snapshots/<commit>/<file>. Its files may
  be symlinks into blobs/ (isfile and open follow them); ours are plain files, which it reads as well.
- A snapshot with config.json and all its weights (safetensors_files) is used without a request.
- Downloads: urllib from $HF_ENDPOINT/{repo}/resolve/{revision}/{file}, never *.bin. The commit is config.json's
  X-Repo-Commit header (a small git file is answered directly, not redirected to the CDN). An optional file that
  answers 404 is absent. A file already in the snapshot was complete when renamed there and is not fetched again.
- HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), as in huggingface_hub: the cache only, never the network.
- Each file streams into <file>.<pid>.incomplete (concurrent ranks do not collide), renamed once it has the
  announced Content-Length: an interrupted download never leaves a truncated file.
"""
import contextlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from .load import CheckpointError, reading, safetensors_files


OPTIONAL_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "generation_config.json",
                  "preprocessor_config.json", "processor_config.json"]


TRUE = ("1", "true", "yes", "on")


class HubError(OSError):
    pass


def hub_cache():
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


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
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    with contextlib.suppress(CheckpointError):  # no weights, a missing shard, an unreadable index
        if os.path.isfile(os.path.join(snapshot, "config.json")) and safetensors_files(snapshot):
            return snapshot
    offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "").lower() in TRUE]
    if offline:
        raise HubError(f"{src}: no complete copy in the HF cache at {repo_dir}, and {offline[0]} is set: no "
                       "downloads. Pass a local folder")

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

        index, shards = os.path.join(snapshot, "model.safetensors.index.json"), ["model.safetensors"]
        if get("model.safetensors.index.json"):
            with reading(index), open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
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

