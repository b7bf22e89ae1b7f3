"""Numbers as operators type them into variables and options: ASCII digits, no more.

``int()`` and ``float()`` read more than that: ``"5_0"`` is 50, ``"\u0665"`` (an Arabic-Indic
digit) is 5, ``" 5 "`` is 5, and ``float()`` takes ``"nan"`` and ``"infinity"``. A value
written so is a typo or a paste gone wrong; the gateway refuses it at start-up (exit 2)
rather than run on a number nobody meant. An optional sign, a fraction and an exponent are
ordinary decimal notation and stay accepted where a fraction makes sense.
"""

from __future__ import annotations

import re

_WHOLE = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def whole(text: str) -> int:
    """``text`` as an integer in plain decimal digits; ValueError for anything else."""
    if _WHOLE.fullmatch(text) is None:
        raise ValueError(f"not a whole number in decimal digits: {text!r}")
    return int(text)


def decimal(text: str) -> float:
    """``text`` as a finite-looking decimal (``5``, ``2.5``, ``.5``, ``1e3``); ValueError for
    anything else (the caller bounds the value)."""
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError(f"not a decimal number: {text!r}")
    return float(text)
