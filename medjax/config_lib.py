"""Helpers for configs/*.py: parsing the variant argument of `get_config(arg)`.

A config file is addressed as `configs/crl.py:smoke,stage=segment`: everything after the
colon is a comma-separated list of variants, `name` (a boolean switch) or `name=value`, so
variants compose. An unknown variant name is an error that lists the known ones.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_variants(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses 'smoke,stage=keypoints' against `defaults` (name -> default value).

    Values are converted to the type of the default; a bare name sets a boolean to True.

    Returns:
      A locked ConfigDict holding every variant (defaults filled in).

    Raises:
      ValueError: naming an unknown variant or a value that does not fit its type.
    """
    values = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, has_value, raw = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ValueError(
                f"Unknown config variant {name!r} in {arg!r}; known variants: "
                f"{', '.join(sorted(defaults))}."
            )
        default = defaults[name]
        if not has_value:
            if not isinstance(default, bool):
                raise ValueError(f"Config variant {name!r} needs a value: {name}=...")
            values[name] = True
        elif isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"Config variant {name}={raw!r}: expected true or false.")
            values[name] = raw.lower() in ("true", "1")
        else:
            try:
                values[name] = type(default)(raw)
            except ValueError:
                raise ValueError(
                    f"Config variant {name}={raw!r}: expected a {type(default).__name__}."
                ) from None
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raises ValueError unless `value` is one of `choices`, naming the config key."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")
