"""nanoblip2.cli: --key=value and JSON config files over a config dataclass."""
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanoblip2.cli import parse_args


@dataclass
class Cfg:
    lr: float = 1e-4
    steps: int = 10
    name: str = "a"
    flag: bool = False
    maybe: str | None = "x"


def test_flags_and_config_files_apply_in_order(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"lr": 0.5, "steps": 7, "flag": True, "maybe": None, "name": "from file"}))
    cfg = parse_args(Cfg(), ["--steps=3", str(f), "--name=b", "--flag=false"])
    assert (cfg.lr, cfg.steps, cfg.name, cfg.flag, cfg.maybe) == (0.5, 7, "b", False, None)
    assert parse_args(Cfg(), ["--flag"]).flag is True
    cfg = parse_args(Cfg(), ["--name", "c d", "--flag", "--steps", "5", "--lr=2"])  # --key value, as argparse
    assert (cfg.name, cfg.flag, cfg.steps, cfg.lr) == ("c d", True, 5, 2.0)


@pytest.mark.parametrize("argv, message", [
    (["--nope=1"], "unknown option --nope; see -h"),
    (["--steps=1.5"], "--steps wants int, got '1.5'"),
    (["--steps"], "--steps needs a value"),
    (["--flag=maybe"], "--flag wants true or false"),
    (["positional"], "unexpected argument 'positional'"),
    (["missing.json"], "config file missing.json"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(Cfg(), argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    for text, message in [("{", "bad.json: Expecting"), ("[1]", "bad.json: wants a JSON object"),
                          ('{"colour": "red"}', "unknown option --colour (in " + str(bad) + ")"),
                          ('{"steps": "ten"}', "--steps wants int, got 'ten'")]:
        bad.write_text(text)
        with pytest.raises(SystemExit) as e:
            parse_args(Cfg(), [str(bad)])
        assert message in str(e.value), (text, str(e.value))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "config").glob("*.json")), ids=lambda p: p.name)
def test_shipped_config_files_parse(path):
    script = Path(__file__).parents[1] / ("train_stage1.py" if path.name.startswith("stage1") else "train_stage2.py")
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines TrainConfig; main() runs only as __main__
    cfg = parse_args(module.TrainConfig(), [str(path)])
    assert cfg.train_ann in ("data/coco/train.json", "data/vqav2/train.json") and cfg.augment and cfg.out_dir != module.TrainConfig().out_dir
