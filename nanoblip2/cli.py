"""
`--key=value` overrides for the config dataclass at the top of each script (nanoGPT's configurator, without exec).
Values are parsed by the field's type; an unknown key or a bad value is a one-line error; -h lists the fields.
"""
import dataclasses
import sys


def _parse(value, typ, key):
    if typ in (bool, "bool"):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise SystemExit(f"error: --{key} wants true or false, got {value!r}")
    for t in (int, float, str):
        if typ in (t, t.__name__):
            try:
                return t(value)
            except ValueError:
                raise SystemExit(f"error: --{key} wants {t.__name__}, got {value!r}") from None
    if "None" in str(typ):  # e.g. "str | None", "int | None"
        if value.lower() == "none":
            return None
        return _parse(value, str(typ).split("|")[0].strip(), key)
    raise SystemExit(f"error: --{key} has a type ({typ}) that cannot be set from the command line")


def parse_args(cfg, argv=None, doc=""):
    """Override the fields of the dataclass instance `cfg` from `--key=value` arguments; returns cfg."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip() + "\n\noptions (--key=value):")
        for f in fields.values():
            print(f"  --{f.name}={getattr(cfg, f.name)!r}")
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; options are --key=value, see -h")
        key, eq, value = arg[2:].partition("=")
        if key not in fields:
            raise SystemExit(f"error: unknown option --{key}; see -h for the options")
        if not eq:
            if fields[key].type not in (bool, "bool"):
                raise SystemExit(f"error: --{key} needs a value: --{key}=...")
            value = "true"
        setattr(cfg, key, _parse(value, fields[key].type, key))
    return cfg
