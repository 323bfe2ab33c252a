"""The Hub path of load.resolve, against a fake Hub on 127.0.0.1: download layout, cache hits, huggingface_hub's
blobs+symlinks layout, interrupted downloads, no network, unknown repos."""
import hashlib
import http.server
import json
import os
import pathlib
import re
import socket
import threading
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoblip2.hub import HubError, hub_cache, resolve
from nanoblip2.load import safetensors_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_safetensors(tmp_path, name="w.safetensors"):
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / name)
    return (tmp_path / name).read_bytes()


def repo_files(tmp_path, sharded=False):
    files = {"config.json": b'{"model_type": "blip-2"}', "tokenizer.json": b'{"version": "1.0"}',
             "pytorch_model.bin": b"never fetched"}
    if sharded:
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1], "c": shards[0]}}
        files["model.safetensors.index.json"] = json.dumps(index).encode()
        files[shards[0]], files[shards[1]] = tiny_safetensors(tmp_path), b"x" * 3000
    else:
        files["model.safetensors"] = tiny_safetensors(tmp_path)
    return files


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub: repos[(repo, file)] = bytes, served at /{repo}/resolve/main/{file}; `short` files announce more
    bytes than they send, then close; `status[repo]` answers every file of that repo with an error code."""
    repos, log, short, status = {}, [], set(), {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log.append(self.path)
            repo, _, rest = self.path.lstrip("/").partition("/resolve/main/")
            if repo in status:
                return self.send_error(status[repo])
            body = repos.get((repo, rest))
            if body is None:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(body) + (1000 if rest in short else 0)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if rest in short else body)
            self.close_connection = rest in short

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "*")
    yield SimpleNamespace(repos=repos, log=log, short=short, status=status, cache=tmp_path / "cache")
    server.shutdown()
    server.server_close()


def serve(hub, files, repo="org/name"):
    hub.repos.update({(repo, k): v for k, v in files.items()})


@pytest.mark.parametrize("sharded", [False, True])
def test_download_fills_the_cache_layout(hub, tmp_path, sharded):
    files = repo_files(tmp_path, sharded)
    serve(hub, files)
    snap = resolve("org/name")
    repo_dir = hub.cache / "models--org--name"
    assert snap == str(repo_dir / "snapshots" / COMMIT)
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    wanted = {k for k in files if not k.endswith(".bin")}
    assert set(os.listdir(snap)) == wanted  # optional files that 404 are skipped, *.bin never fetched
    for name in wanted:
        assert (pathlib.Path(snap) / name).read_bytes() == files[name]
    assert not any(p.endswith(".bin") for p in hub.log)
    assert "/org/name/resolve/main/vocab.txt" in hub.log  # asked for, answered 404
    first = safetensors_files(snap)[0]  # model.safetensors or model-00001-of-00002.safetensors
    torch.testing.assert_close(load_file(first)["w"], torch.arange(6.0).reshape(2, 3))
    if not sharded:
        hf = pytest.importorskip("huggingface_hub")  # our plain-file snapshot is also readable by huggingface_hub
        assert hf.try_to_load_from_cache("org/name", "config.json", cache_dir=str(hub.cache)) == f"{snap}/config.json"


def test_cache_hit_makes_no_request(hub, tmp_path):
    serve(hub, repo_files(tmp_path, sharded=True))
    snap = resolve("org/name")
    n = len(hub.log)
    assert resolve("org/name") == snap
    assert resolve("org/name", revision=COMMIT) == snap  # a commit hash needs no refs/ lookup
    assert len(hub.log) == n


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_uses_the_cache_and_never_the_network(hub, tmp_path, monkeypatch, var):
    serve(hub, repo_files(tmp_path, sharded=False))
    snap = resolve("org/name")  # online: downloaded into the cache
    n = len(hub.log)
    monkeypatch.setenv(var, "1")
    assert resolve("org/name") == snap  # offline: the cached copy
    serve(hub, repo_files(tmp_path, sharded=False), repo="org/other")
    with pytest.raises(HubError, match=f"org/other: no complete copy in the HF cache .*, and {var} is set"):
        resolve("org/other")  # served, but offline means no request at all
    assert len(hub.log) == n


def test_huggingface_hub_blob_symlinks_are_used(hub, tmp_path):
    """huggingface_hub writes blobs/<sha> and relative symlinks to them in snapshots/<commit>/."""
    files = repo_files(tmp_path)
    serve(hub, files)
    repo_dir = hub.cache / "models--org--name"
    commit = "f" * 40
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        sha = hashlib.sha256(files[name]).hexdigest()
        (repo_dir / "blobs" / sha).write_bytes(files[name])
        os.symlink(f"../../blobs/{sha}", repo_dir / "snapshots" / commit / name)
    snap = resolve("org/name")
    assert snap == str(repo_dir / "snapshots" / commit)
    assert hub.log == []
    torch.testing.assert_close(load_file(os.path.join(snap, "model.safetensors"))["w"], torch.arange(6.0).reshape(2, 3))


def test_incomplete_cache_fetches_only_what_is_missing(hub, tmp_path):
    files = repo_files(tmp_path, sharded=True)
    serve(hub, files)
    snap = hub.cache / "models--org--name" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (hub.cache / "models--org--name" / "refs").mkdir()
    (hub.cache / "models--org--name" / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        (snap / name).write_bytes(files[name])
    assert resolve("org/name") == str(snap)
    fetched = {p.rsplit("/", 1)[1] for p in hub.log}
    assert "model-00002-of-00002.safetensors" in fetched and "model-00001-of-00002.safetensors" not in fetched
    assert (snap / "model-00002-of-00002.safetensors").read_bytes() == files["model-00002-of-00002.safetensors"]


def test_interrupted_download_leaves_nothing_under_the_final_name(hub, tmp_path):
    files = repo_files(tmp_path)
    serve(hub, files)
    hub.short.add("model.safetensors")  # sends half of the file, announces 1000 bytes more than it has
    url, n = f"{os.environ['HF_ENDPOINT']}/org/name/resolve/main/model.safetensors", len(files["model.safetensors"])
    with pytest.raises(HubError, match=f"^download of {re.escape(url)} (interrupted: got {n // 2} of {n + 1000}|failed)"):
        resolve("org/name")
    snap = hub.cache / "models--org--name" / "snapshots" / COMMIT
    assert sorted(os.listdir(snap)) == ["config.json"]  # no model.safetensors, no temporary file
    assert not (hub.cache / "models--org--name" / "refs").exists()
    hub.short.clear()  # the next try completes the snapshot
    assert resolve("org/name") == str(snap) and (snap / "model.safetensors").is_file()


def test_no_network_says_pass_a_local_folder(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "*")
    with pytest.raises(HubError) as e:
        resolve("Salesforce/blip2-opt-2.7b")
    msg = str(e.value)
    assert "\n" not in msg and e.value.__cause__ is None and e.value.__suppress_context__
    assert msg.startswith(f"cannot download Salesforce/blip2-opt-2.7b from http://127.0.0.1:{port} (")
    repo_dir = tmp_path / "cache" / "models--Salesforce--blip2-opt-2.7b"
    assert msg.endswith(f"no complete copy in the HF cache at {repo_dir}. Pass a local folder instead.")
    assert "refused" in msg.lower()


@pytest.mark.parametrize("code", [404, 401])
def test_unknown_or_gated_repo_says_not_found(hub, code):
    hub.status["org/missing"] = code
    with pytest.raises(HubError, match=f"^org/missing: no such local folder, and repo or revision 'main' not found "
                                       f".*gated or private: HTTP {code} for config.json"):
        resolve("org/missing")
    assert not (hub.cache / "models--org--missing").exists()


def test_local_folder_is_returned_unchanged(hub, tmp_path):
    assert resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(HubError, match="not a folder, and not a Hub id"):
        resolve(str(tmp_path / "no" / "such" / "folder"))
    assert hub.log == []


def test_cache_folder_follows_the_hf_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert hub_cache() == str(tmp_path / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == str(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache() == str(tmp_path / "elsewhere")
