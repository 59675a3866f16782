"""Command-line helpers: number checks for argparse `type=` (a bad value is one clear usage error at parse time),
presets that fill the flags left unset, and the settings that decide an output."""
import argparse
import math
from pathlib import Path


def _number(text, convert, ok, need):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if convert is int else 'a number'}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
    return value


def positive_int(text):
    return _number(text, int, lambda v: v >= 1, "at least 1")


def nonnegative_int(text):
    return _number(text, int, lambda v: v >= 0, "0 or more")


def positive_float(text):
    return _number(text, float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def nonnegative_float(text):
    return _number(text, float, lambda v: v >= 0 and math.isfinite(v), "0 or a positive number")


def unit_fraction(text):
    return _number(text, float, lambda v: 0 <= v <= 1, "between 0 and 1")


def settings_of(args, *names):
    """The settings that decide an output, as JSON-safe values (compared by already_done)."""
    return {n: (str(v) if isinstance(v, Path) else v) for n, v in ((n, getattr(args, n)) for n in names)}


def apply_preset(args, presets, default):
    """Fill each flag left unset (None) from the preset args.preset (or `default`): a flag given on the command line
    wins over its preset's value."""
    args.preset = args.preset or default
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args

