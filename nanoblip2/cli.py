"""
`--key=value` overrides for the config dataclass at the top of each script (nanoGPT's configurator, without exec).
Values are parsed by the field's type; an unknown key or a bad value is a one-line error; -h lists the fields.
`--key value` works too, except for booleans, where a bare `--key` means true. A JSON file of {"key": value} sets
its keys the same way, in order: `python train_stage1.py config/stage1_coco_vitg.json --batch_size=32`.
`run(main, cfg)` runs a script: a file or folder that cannot be used (CheckpointError, AnnotationError, ImageError,
HubError, a missing file) is one line `error: ...` on stderr and exit status 2, never a traceback.
"""
import dataclasses
import json
import sys

from .data import AnnotationError, ImageError
from .hub import HubError
from .load import CheckpointError


def _parse(value, typ, key):
    if typ in (bool, "bool"):
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise SystemExit(f"error: --{key} wants true or false, got {value!r}")
        return value.lower() in ("1", "true", "yes")
    for t in (int, float, str):
        if typ in (t, t.__name__):
            try:
                return t(value)
            except ValueError:
                raise SystemExit(f"error: --{key} wants {t.__name__}, got {value!r}") from None
    if "None" in str(typ):  # e.g. "str | None", "int | None"
        return None if value.lower() == "none" else _parse(value, str(typ).split("|")[0].strip(), key)
    raise SystemExit(f"error: --{key} has a type ({typ}) that cannot be set from the command line")


def parse_args(cfg, argv=None, doc=""):
    """Override the fields of the dataclass instance `cfg` from `--key=value` arguments; returns cfg."""
    args = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if any(a in ("-h", "--help") for a in args):
        print(doc.strip() + "\n\noptions (--key=value):")
        for f in fields.values():
            print(f"  --{f.name}={getattr(cfg, f.name)!r}")
        raise SystemExit(0)
    pairs = []  # (key, "=" or "", value, where), from config files and --key=value, in order
    while args:
        arg = args.pop(0)
        if arg.endswith(".json") and not arg.startswith("--"):
            try:
                with open(arg, encoding="utf-8") as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise SystemExit(f"error: config file {arg}: {e}") from None
            if not isinstance(d, dict):
                raise SystemExit(f"error: config file {arg}: wants a JSON object of option: value")
            as_text = lambda v: "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            pairs += [(k, "=", as_text(v), f" (in {arg})") for k, v in d.items()]
        elif not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; options are --key=value or a .json file, see -h")
        else:
            key, eq, value = arg[2:].partition("=")
            if not eq and key in fields and fields[key].type not in (bool, "bool") and args \
                    and not args[0].startswith("--"):
                eq, value = "=", args.pop(0)  # --key value
            pairs.append((key, eq, value, ""))
    for key, eq, value, where in pairs:
        if key not in fields:
            raise SystemExit(f"error: unknown option --{key}{where}; see -h for the options")
        if not eq:
            if fields[key].type not in (bool, "bool"):
                raise SystemExit(f"error: --{key} needs a value: --{key}=...")
            value = "true"
        setattr(cfg, key, _parse(value, fields[key].type, key))
    return cfg


def run(main, cfg):
    try:
        main(cfg)
    except (AnnotationError, CheckpointError, FileNotFoundError, HubError, ImageError) as e:  # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
