"""
Command-line configuration in nanoGPT's style, without exec into the caller's globals:

    python train.py config/train_shakespeare_char.py --batch_size=32 --device=cpu

Each script declares its settings and defaults once, as a dataclass. `configure(Defaults, argv)`
applies config files (Python files that assign settings) and then --key=value overrides, in order,
and returns a new instance. Values are Python literals (`--learning_rate=3e-4`, `--bias=True`,
`--top_k=None`); anything that is not a literal is a string (`--device=cpu`).
"""

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import types
import typing


class UserError(Exception):
    """A problem with what the user asked for; the script's entry point prints it as one line."""
    exit_code = 1

    def line(self):
        return f"error: {self}"


class ConfigError(UserError):
    exit_code = 2


def configure(config_class, argv):
    """Return config_class() updated by the config files and --key=value overrides in argv.
    --help (or -h) prints every setting instead, and exits."""
    if "--help" in argv or "-h" in argv:
        try:
            print(help_text(config_class), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    values = {}
    for arg in [a for a in argv if not a.startswith("--")]:  # config files first, in order
        for key, value in read_config_file(arg).items():
            _check_known(key, fields, f"'{key}' in {arg}", config_class)
            values[key] = _coerce(key, value, fields[key].type, arg)
    for arg in [a for a in argv if a.startswith("--")]:  # then the overrides, wherever they were typed
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"'{arg}' has no value; write --{key}=VALUE")
        _check_known(key, fields, f"'--{key}'", config_class)
        values[key] = _coerce(key, _command_line_value(raw, fields[key].type), fields[key].type, f"--{key}")
    if "given_settings" in fields:  # for settings that follow others unless given (sizing.py)
        values["given_settings"] = tuple(sorted(values))
    return config_class(**values)


def help_text(config_class):
    """Usage, then each setting with its default, type and meaning, read from the dataclasses that
    declare them (the comment on a field's line is its meaning; a comment line above opens a group)."""
    script = os.path.basename(sys.argv[0]) or "script.py"
    lines = [f"usage: python {script} [CONFIG.py ...] [--key=value ...]", "",
             " ".join((config_class.__doc__ or "").strip().split("\n\n")[0].split()),
             "Config files (Python files that assign settings) apply first, then --key=value overrides, "
             "in order;", "values are Python literals (3e-4, True, None), anything else is a string.", ""]
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    skip = getattr(config_class, "not_settings", {})
    shown = set()
    for klass in config_class.__mro__:
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        rows = []
        for name, text in _commented_fields(klass):
            if name is None:
                rows.append(f"  {text}:")
            elif name in fields and name not in skip and name not in shown:
                shown.add(name)
                f = fields[name]
                setting = f"--{name}={show_value(f.default)}"
                kind = getattr(f.type, "__name__", str(f.type))
                rows.append(f"    {setting:<34} {kind:<11} {text}")
        if any(not r.endswith(":") for r in rows):
            lines += [f"{klass.__name__} ({_file_name(klass)}):"] + rows + [""]
    return "\n".join(lines).rstrip()


def _file_name(klass):
    try:
        return os.path.basename(inspect.getfile(klass))
    except TypeError:
        return klass.__module__


def show_value(value):
    """A value as it is typed after --key=: strings bare, unless quotes are needed to see them."""
    if isinstance(value, str) and value and value == value.strip() and value.isprintable():
        return value
    return repr(value)


def _commented_fields(klass):
    """(field name, its comment) for each field a dataclass declares, in order, and (None, text) for
    a comment line of its own among them."""
    try:
        source = inspect.getsource(klass)
    except (OSError, TypeError):
        return [(f.name, "") for f in dataclasses.fields(klass)]
    own = set(klass.__dict__.get("__annotations__", {}))
    found = []
    for line in source.splitlines()[1:]:
        field = re.match(r"^    (\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        group = re.match(r"^    #\s*(.+)$", line)
        if field and field.group(1) in own:
            found.append((field.group(1), (field.group(2) or "").strip()))
        elif group:
            found.append((None, group.group(1).strip()))
        elif re.match(r"^    (def|@)", line):
            break
    return found


def read_config_file(path):
    """The settings a config file assigns, as a dict (modules, functions and _private names skipped).
    A config file is Python, run as nanoGPT runs them: only run config files you trust."""
    if os.path.isdir(path):
        raise ConfigError(f"config file '{path}' is a folder; give a .py file that assigns settings")
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found (arguments that are not --key=value name config files)")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"can't read config file '{path}': {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text; is it a config file?") from None
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:
        raise ConfigError(f"config file '{path}' failed to run: {type(e).__name__}: {first_line(e, '')}") from None
    settings = {k: v for k, v in namespace.items()
                if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    if not settings:  # a JSON file, say, runs as Python without assigning anything
        raise ConfigError(f"config file '{path}' sets nothing; a config file assigns settings in Python, "
                          f"one a line: n_layer = 4")
    return settings


def _check_known(key, fields, where, config_class):
    not_settings = getattr(config_class, "not_settings", {})  # fields the script sets itself, and why
    if key in not_settings:
        raise ConfigError(f"{where} is not a setting here: {not_settings[key]}; remove it")
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key {where}{hint}")


def _parse_literal(raw):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw  # a bare string such as cpu or out-shakespeare-char


def _command_line_value(raw, annotation):
    """The value of --key=raw: a Python literal, or the text itself where the setting takes a string
    and not what the literal is (--start=42 is the prompt "42", --out_dir=2024 a folder)."""
    value = _parse_literal(raw)
    allowed = _allowed_types(annotation)
    return raw if str in allowed and not any(type(value) is t for t in allowed) else value


def _allowed_types(annotation):
    """The types a field's annotation allows: (int,) for int, (str, NoneType) for str | None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if union else (annotation,)


def _coerce(key, value, annotation, where):
    """Check value against the field's type; an int is accepted where a float is expected."""
    allowed = _allowed_types(annotation)
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r} from {where}")
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (bool, str) and type(value) is t:
            return value
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__}) from {where}")


def check(ok, key, value, allowed):
    """For a config's __post_init__: one line naming the setting, its value and what is allowed."""
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def check_seed(seed):
    """A seed numpy and torch both take (numpy's generators refuse negative ones)."""
    check(0 <= seed < 2 ** 63, "seed", seed, "between 0 and 2**63 - 1")


def as_config_error(checks):
    """Run checks() that raise ValueError (those of a class that stands alone, such as GPTConfig in
    model.py) as a config's checks: one-line ConfigErrors."""
    try:
        checks()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_choice(key, value, allowed):
    ok = value in allowed and type(value) in {type(a) for a in allowed}  # True is not 1
    check(ok, key, value, "one of " + ", ".join(repr(a) for a in allowed))


def first_line(error, empty=None):
    """An exception's message cut to its first line, for one-line errors (its type's name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else (type(error).__name__ if empty is None else empty)


def run_main(main):
    """Run main(sys.argv[1:]) as a script: a UserError becomes one line on stderr and a non-zero exit."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(e.line(), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
