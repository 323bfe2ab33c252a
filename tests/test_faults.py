"""Bad input and faults: every file that loading cannot use is one CheckpointError (AnnotationError, ImageError) that
names it, and one line `error: ...` from the scripts, never a traceback. A checkpoint folder that a run names is
always there, whole, wherever the run is killed while it saves."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nanoblip2.checkpoint import save_checkpoint
from nanoblip2.load import CheckpointError
from nanoblip2.stage1 import Blip2Stage1
from nanoblip2.stage2 import Blip2
from nanoblip2.t5 import T5
from nanoblip2.tokenizer import load_bert_tokenizer, load_opt_tokenizer
from test_train_stage1 import ROOT, data, losses  # noqa: F401  (data is a fixture)


def script(name, *args, env=None):
    p = subprocess.run([sys.executable, os.path.join(ROOT, name), *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    return p.returncode, p.stderr


def one_line(error, *names):
    """The message of an error raised by the API or printed by a script: one line, naming each of `names`."""
    assert "Traceback" not in error, error
    line = error.strip().splitlines()[-1] if error.strip() else ""
    assert error.count("error: ") <= 1 and all(str(n) in line for n in names), (names, error)
    return line


def fails(name, *args, names=()):
    code, err = script(name, *args)
    assert code == 2, err
    return one_line(err, *names).removeprefix("error: ")


def raises(call, *names):
    with pytest.raises(CheckpointError) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)
    return one_line(str(e.value), *names)


def copy(src, dst):
    shutil.copytree(src, dst, symlinks=False)
    return dst


def stage1_args(data, itm, out, *extra):
    return [f"--vit={itm}", f"--bert={data / 'bert'}", f"--train_ann={data / 'train.json'}", "--val_ann=",
            f"--image_root={data / 'images'}", f"--out_dir={out}", "--image_size=28", "--batch_size=4",
            "--num_workers=0", "--warmup_steps=2", "--log_interval=1", "--test_ann=", "--eval_interval=2",
            "--lr_decay_steps=6", *extra]


@pytest.fixture(scope="module")
def ckpt(data, itm_folder, tmp_path_factory):
    """A stage-1 checkpoint at step 2, written by train_stage1.py."""
    out = tmp_path_factory.mktemp("ckpt")
    code, err = script("train_stage1.py", *stage1_args(data, itm_folder[0], out, "--max_steps=2"))
    assert code == 0, err
    return out


def picture(tmp_path):
    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "red.png")
    return f"--image={tmp_path / 'red.png'}"


@pytest.mark.parametrize("size", [0, 5, "half"])
def test_truncated_safetensors(size, data, itm_folder, blip2_opt, blip2_t5, tmp_path):
    for kind, folder in (("itm", itm_folder[0]), ("opt", blip2_opt[0]), ("t5", blip2_t5[0])):
        f = copy(folder, tmp_path / kind) / "model.safetensors"
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2 if size == "half" else size])
    what = "incomplete metadata, file not fully covered" if size == "half" else "header too small"
    msg = raises(lambda: Blip2Stage1.from_pretrained(str(tmp_path / "itm")), tmp_path / "itm" / "model.safetensors")
    assert msg.endswith(f"cannot be read (SafetensorError: Error while deserializing header: {what})"), msg
    raises(lambda: Blip2.from_pretrained(str(tmp_path / "opt")), tmp_path / "opt" / "model.safetensors", what)
    raises(lambda: T5.from_pretrained(str(tmp_path / "t5")), tmp_path / "t5" / "model.safetensors", what)
    if size == 5:  # the scripts: the same line after "error: "
        assert fails("sample.py", picture(tmp_path), f"--init_from={tmp_path / 'opt'}") == \
            raises(lambda: Blip2.from_pretrained(str(tmp_path / "opt")))
        fails("train_stage1.py", *stage1_args(data, tmp_path / "itm", tmp_path, "--max_steps=1"),
              names=[tmp_path / "itm" / "model.safetensors", what])


def test_our_checkpoint_truncated_or_not_json(ckpt, data, itm_folder, tmp_path):
    out = copy(ckpt, tmp_path / "run")
    weights = out / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    raises(lambda: Blip2Stage1.from_pretrained(str(out / "ckpt")), weights, "invalid header length")
    fails("train_stage1.py", *stage1_args(data, itm_folder[0], out, "--init_from=resume", "--max_steps=4"),
          names=[weights, "SafetensorError"])
    (out / "ckpt" / "config.json").write_text('{"nanoblip2": "stage1",')
    fails("train_stage1.py", *stage1_args(data, itm_folder[0], out, "--init_from=resume", "--max_steps=4"),
          names=[out / "ckpt" / "config.json", "JSONDecodeError"])


def test_config_not_json(data, itm_folder, blip2_opt, tmp_path):
    for kind, folder in (("itm", itm_folder[0]), ("opt", blip2_opt[0])):
        (copy(folder, tmp_path / kind) / "config.json").write_text("{'model_type': 'blip-2'}")
    config = tmp_path / "itm" / "config.json"
    msg = raises(lambda: Blip2Stage1.from_pretrained(str(tmp_path / "itm")), config)
    assert msg == f"{config}: cannot be read (JSONDecodeError: Expecting property name enclosed in double quotes: " \
                  "line 1 column 2 (char 1))"
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[]")
    raises(lambda: Blip2.from_pretrained(str(tmp_path / "list")), tmp_path / "list" / "config.json", "not a JSON")
    fails("train_stage1.py", *stage1_args(data, tmp_path / "itm", tmp_path, "--max_steps=1"),
          names=[config, "JSONDecodeError"])
    fails("sample.py", picture(tmp_path), f"--init_from={tmp_path / 'opt'}",
          names=[tmp_path / "opt" / "config.json", "JSONDecodeError"])


def test_wrong_kind_of_folder_in_training(data, itm_folder, bert_folder, tmp_path):
    msg = fails("train_stage1.py", *stage1_args(data, bert_folder[0], tmp_path, "--max_steps=1"))
    assert msg == f"{bert_folder[0]}: model_type 'bert' is not a BLIP-2 or CLIP vision model", msg
    msg = fails("train_stage1.py", *stage1_args(data, itm_folder[0], tmp_path, "--max_steps=1"),
                f"--bert={itm_folder[0]}")
    assert msg == f"{itm_folder[0]}: model_type 'blip-2' is not BERT", msg


def test_no_readable_image_stops_after_one_pass(data, itm_folder, tmp_path):
    """Before, the stream skipped and counted epoch after epoch, for ever (the timeout would fail this)."""
    (tmp_path / "none").mkdir()
    msg = fails("train_stage1.py", *stage1_args(data, itm_folder[0], tmp_path, "--max_steps=2"),
                f"--image_root={tmp_path / 'none'}")
    assert msg == f"{tmp_path / 'none'}: not one image of {data / 'train.json'} could be read (8 tried)", msg


class Payload:
    """A pickle that would run a command when loaded."""
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def test_optimiser_state_truncated_or_malicious(ckpt, data, itm_folder, tmp_path):
    out = copy(ckpt, tmp_path / "run")
    optim = out / "ckpt" / "optim.pt"
    good = optim.read_bytes()
    resume = stage1_args(data, itm_folder[0], out, "--init_from=resume", "--max_steps=4")
    optim.write_bytes(good[:len(good) // 2])
    msg = fails("train_stage1.py", *resume, names=[optim])
    assert msg == (f"{optim}: cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive: "
                   "failed finding central directory)"), msg
    torch.save({"optimizer": Payload(tmp_path / "ran"), "rng": {}}, optim)
    msg = fails("train_stage1.py", *resume, names=[optim])
    assert msg == f"{optim}: cannot be read (UnpicklingError: unsupported GLOBAL posix.system)", msg
    assert not (tmp_path / "ran").exists()  # refused, not run


def test_corrupt_tokenizer_files(data, blip2_opt, itm_folder, tmp_path):
    bert = copy(data / "bert", tmp_path / "bert")
    (bert / "vocab.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    msg = raises(lambda: load_bert_tokenizer(bert), bert / "vocab.txt", "UnicodeDecodeError")
    assert fails("train_stage1.py", *stage1_args(data, itm_folder[0], tmp_path, "--max_steps=1"), f"--bert={bert}") \
        == msg
    (bert / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    raises(lambda: load_bert_tokenizer(bert), bert / "tokenizer.json", "cannot be read")
    opt = copy(blip2_opt[0], tmp_path / "opt")
    (opt / "tokenizer.json").write_text("not json")
    raises(lambda: load_opt_tokenizer(opt), opt / "tokenizer.json", "cannot be read")
    raises(lambda: Blip2.from_pretrained(str(opt)), opt / "tokenizer.json", "cannot be read")
    (opt / "tokenizer.json").unlink()
    (opt / "tokenizer_config.json").write_text("{")
    raises(lambda: load_opt_tokenizer(opt), opt / "tokenizer_config.json", "JSONDecodeError")


# --- saving ------------------------------------------------------------------------------------------------------

KILLER = '''
import os, runpy, shutil, sys
import safetensors.torch, torch
sys.path.insert(0, os.getcwd())
import nanoblip2.checkpoint as checkpoint


class Killer:
    """Exits the process, as a kill would, just before the N-th file-system call of the second save."""

    def __init__(self, n):
        self.n, self.calls, self.saves = n, 0, 0

    def hook(self, module, name):
        f = getattr(module, name)

        def call(*args, **kwargs):
            if self.saves == 2:
                self.calls += 1
                if self.calls == self.n:
                    os._exit(9)
            return f(*args, **kwargs)
        setattr(module, name, call)

    def save(self, *args, **kwargs):
        self.saves += 1
        save(*args, **kwargs)
        if self.saves == 2:
            print(f"hooked calls: {self.calls}")


killer, save = Killer(int(os.environ["KILL_AT"])), checkpoint.save_checkpoint
for module, name in ((os, "mkdir"), (safetensors.torch, "save_file"), (torch, "save"), (os, "symlink"),
                     (os, "replace"), (os, "rename"), (shutil, "rmtree"), (os, "rmdir")):
    killer.hook(module, name)
import nanoblip2.training  # noqa: E402  (and so each module that saves: the hook replaces their save_checkpoint)
for m in list(sys.modules.values()):
    if getattr(m, "save_checkpoint", None) is save:
        m.save_checkpoint = killer.save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_a_kill_at_any_point_of_a_save_leaves_the_folder_whole(data, itm_folder, tmp_path):
    """train_stage1.py saves at steps 2 and 4; the second save is cut before each of its steps in turn (the new
    folder, its tensors, its optimiser state, the symlink, the switch, deleting the old folder, its last rmdir).
    Then the named folder is the checkpoint of step 2 up to the switch and that of step 4 after it, it loads, and
    a resume from it continues with the same losses as the run that was never killed. The next save clears what
    the cut one left."""
    (tmp_path / "killer.py").write_text(KILLER)

    def run(out, n, *extra):
        args = [str(tmp_path / "killer.py"), "train_stage1.py", *stage1_args(data, itm_folder[0], out, *extra)]
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env=dict(os.environ, KILL_AT=str(n), OMP_NUM_THREADS="1"))
        assert p.returncode == (9 if n else 0), p.stderr[-3000:]
        return p.stdout

    log = run(tmp_path / "full", 0, "--max_steps=6")
    full, n = losses(log), int(log.split("hooked calls: ")[1].split()[0])
    assert len(full) == 6 and n >= 7, log
    assert sorted(os.listdir(tmp_path / "full"))[0] == "ckpt" and len(os.listdir(tmp_path / "full")) == 2
    steps = []
    for k in range(1, n + 1):
        out = tmp_path / f"kill{k}"
        run(out, k, "--max_steps=4")
        steps.append(json.loads((out / "ckpt" / "meta.json").read_text())["step"])
        Blip2Stage1.from_pretrained(str(out / "ckpt"))
        state = torch.load(out / "ckpt" / "optim.pt", weights_only=True)["optimizer"]["state"]
        assert int(state[0]["step"]) == steps[-1]  # optim.pt and meta.json of the same save
    switch = steps.index(4)  # one call switches from the old checkpoint to the new one, for good
    assert steps == [2] * switch + [4] * (n - switch) and 0 < switch < n, steps
    # resume from the kill just before the switch, and from the last kill, with the folder made a real one, as
    # older code wrote it
    last = tmp_path / f"kill{n}"
    target = (last / "ckpt").resolve()
    os.remove(last / "ckpt")
    os.rename(target, last / "ckpt")
    for out, first, left in ((tmp_path / f"kill{switch}", 3, 4), (last, 5, 2)):
        assert len(os.listdir(out)) == left  # what the cut save left: a new folder and its link, or a half-deleted one
        resumed = losses(run(out, 0, "--max_steps=6", "--init_from=resume"))
        assert sorted(resumed) == list(range(first, 7))
        assert all(abs(resumed[s] - full[s]) < 1e-5 for s in resumed), (resumed, full)
        names = sorted(os.listdir(out))
        assert names[0] == "ckpt" and names[1].startswith("ckpt.saved-") and len(names) == 2, names
        assert os.path.islink(out / "ckpt") and os.readlink(out / "ckpt") == names[1]


def test_save_replaces_a_real_folder_in_one_step(tmp_path, monkeypatch):
    """A folder written by older code becomes a link to the new one in one exchange, not two renames; the old one is
    gone, and a file beside it that is not one of the checkpoint's is left alone."""
    monkeypatch.setattr(os, "rename", None)
    folder = str(tmp_path / "ckpt")
    os.makedirs(folder)
    Path(folder, "meta.json").write_text('{"step": 1}')
    (tmp_path / "ckpt.notes").write_text("mine")
    for step in (2, 3):
        save_checkpoint(folder, {"w": torch.ones(2)}, {"nanoblip2": "stage1"}, {"step": step})
        assert json.loads(Path(folder, "meta.json").read_text()) == {"step": step}
        assert os.path.islink(folder) and len(os.listdir(tmp_path)) == 3
    assert (tmp_path / "ckpt.notes").read_text() == "mine"
