"""
The small configurator every stage script shares.

A stage script defines its settings as plain module globals, then calls

    from configs import configure
    configure(globals())

which applies, in order, an optional config file (`python sft.py configs/x.py`)
and `--key=value` overrides. A config file is ordinary Python that assigns some
of the script's globals. Values on the command line are parsed with
ast.literal_eval (so `--lr=3e-4 --compile=True --betas=(0.9,0.95)`), falling back
to the raw string (`--out_dir=out/run1`). Unknown keys and values of the wrong
type stop the run with a message naming the key, where it came from, and the
closest known keys — a typo should never silently train with a default.

A script also declares, beside its globals, what values are valid, and configure()
checks them once all overrides are applied, before any work is done:

    _choices = dict(lr_schedule=("cosine", "wsd", "constant"), parallel=("ddp", "fsdp"))
    _ranges = dict(batch_size="[1, inf)", lr="(0, inf)", label_smoothing="[0, 0.5)",
                   max_steps="[1, inf) or -1")     # interval notation, plus documented sentinel values

A tuple-valued setting with choices (reward_funcs) must have every element among them; a None value
(an optional setting left unset) is not checked.
"""

import ast
import difflib
import math
import sys


def _known_keys(g):
    return {k: v for k, v in g.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, dict, type(None)))}


def _check_and_set(g, known, key, value, where):
    if key not in known:
        close = difflib.get_close_matches(key, known.keys(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SystemExit(f"config error: unknown key '{key}' ({where}).{hint}\n"
                         f"  known keys: {', '.join(sorted(known))}")
    default = known[key]
    if default is not None and value is not None:
        ok = isinstance(value, type(default))
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True  # --lr=1 means 1.0
        if isinstance(default, bool) != isinstance(value, bool):
            ok = False  # True is an int in Python; don't let --n_layer=True or --compile=1 through
        if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
            value, ok = type(default)(value), True
        if not ok:
            raise SystemExit(f"config error: '{key}' ({where}) expects {type(default).__name__} "
                             f"like {default!r}, got {type(value).__name__} {value!r}")
    g[key] = value
    known[key] = value if value is not None else known[key]


def _parse_range(spec):
    """ "[1, inf) or -1" -> (lo, hi, lo_closed, hi_closed, sentinels)."""
    interval, *rest = [part.strip() for part in spec.split(" or ")]
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return lo, hi, interval[0] == "[", interval[-1] == "]", [ast.literal_eval(x) for x in rest]


def _in_range(value, spec):
    lo, hi, lo_closed, hi_closed, sentinels = _parse_range(spec)
    if value in sentinels and not isinstance(value, bool):
        return True
    return (value > lo or (lo_closed and value == lo)) and (value < hi or (hi_closed and value == hi))


def check_values(g, choices, ranges):
    """Raise SystemExit naming the first setting of g outside its declared choices or range."""
    for key, allowed in choices.items():
        value = g[key]
        values = value if isinstance(value, (tuple, list)) else (value,)
        bad = [v for v in values if v is not None and v not in allowed]
        if bad:
            close = difflib.get_close_matches(str(bad[0]), [str(a) for a in allowed], n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SystemExit(f"config error: {key}={value!r} is not valid: choose "
                             f"{'each from' if isinstance(value, (tuple, list)) else 'one of'} "
                             f"{', '.join(map(repr, allowed))}.{hint}")
    for key, spec in ranges.items():
        value = g[key]
        if value is None or isinstance(value, bool):
            continue
        if not (isinstance(value, (int, float)) and not math.isnan(value) and _in_range(value, spec)):
            raise SystemExit(f"config error: {key}={value!r} is out of range: it must be in {spec}")


def configure(g, argv=None):
    """Apply a config file and --key=value overrides from argv (default sys.argv[1:]) to the globals dict g."""
    argv = sys.argv[1:] if argv is None else argv
    known = _known_keys(g)
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise SystemExit(f"config error: '{arg}' is neither a config file (*.py) nor --key=value")
            try:
                source = open(arg).read()
            except OSError as e:
                raise SystemExit(f"config error: cannot read config file {arg}: {e.strerror}")
            scope = {}
            exec(compile(source, arg, "exec"), scope)
            for key, value in scope.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                _check_and_set(g, known, key, value, f"in {arg}")
        else:
            if "=" not in arg:
                raise SystemExit(f"config error: '{arg}' needs a value: write {arg}=VALUE")
            key, raw = arg[2:].split("=", 1)
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare string such as --out_dir=out/run1
            if isinstance(known.get(key), str) and not isinstance(value, str):
                value = raw  # --wandb_run_name=123 stays a string
            _check_and_set(g, known, key, value, f"from --{key}")
    check_values(g, g.get("_choices", {}), g.get("_ranges", {}))
    return {k: g[k] for k in known}


def check_resume(ckpt, config, refuse, warn, where):
    """init_from="resume" from the checkpoint dict ckpt: it must be a run that stopped before its end (it holds
    optimizer state), and the settings in refuse (the model's shape, tokenizer, data) must equal those it was
    trained with — a resumed run keeps the checkpoint's, so a different value would be silently ignored;
    SystemExit names each. Those in warn (schedule, batch size, lr, world size) may change, but then the resumed
    run no longer reproduces the uninterrupted one: a warning says which."""
    if "optimizer" not in ckpt:
        raise SystemExit(f"{where} is the result of a finished run (step {ckpt.get('step')}): nothing to resume. "
                         f"Start a new run (another out_dir), or init_from it.")
    saved = ckpt["config"]
    changed = {k: (saved.get(k), config.get(k)) for k in refuse if saved.get(k) != config.get(k)}
    if changed:
        what = ", ".join(f"{k}={new!r} (checkpoint: {old!r})" for k, (old, new) in changed.items())
        raise SystemExit(f"config error: resuming {where} with {what}: these cannot change on resume. Drop the "
                         f"override(s), or start a new run with another out_dir.")
    drift = {k: (saved.get(k), config.get(k)) for k in warn if saved.get(k) != config.get(k)}
    if drift:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in drift.items())
        print(f"warning: resuming {where} with {what}: the run continues, but no longer exactly as the "
              f"uninterrupted run would have")
