"""Tokens: everything needed to run one schedule again (scenario, switches, parameters, decisions), encoded in one line.

A token is untrusted input (pasted from a mail or a bug report): `Token.decode`
bounds it before decoding and checks every field's type and range, and says
in one line what is wrong with a damaged one.
"""
from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from shmmmu.variants import DEFAULT_PROFILE, PROFILE_NAMES

TOKEN_PREFIX = "shx2-"

# a token is untrusted input (pasted from a mail or a bug report): bounded before it is decoded
MAX_TOKEN_CHARS = 1 << 20
MAX_TOKEN_JSON = 4 << 20
MAX_SWITCHES = 100_000
MAX_STEPS = 10_000_000


def _damaged(why: str) -> ValueError:
    return ValueError(f"the replay token is damaged ({why}); copy it whole")


def _int(x: Any, lo: int, hi: int, what: str) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise _damaged(f"{what} must be an integer from {lo} to {hi}")
    return x


def _str(x: Any, what: str) -> str:
    if type(x) is not str or len(x) > 200:
        raise _damaged(f"{what} must be a short string")
    return x


def _strs(x: Any, what: str) -> list[str]:
    if type(x) is not list or len(x) > 64:
        raise _damaged(f"{what} must be a short list of strings")
    return [_str(v, what) for v in x]


@dataclass
class Token:
    """Everything needed to run one schedule again: scenario, switches, parameters, the schedule's switches
    (step, k, actor), and what it found."""

    scenario: str
    bugs: list[str]
    params: dict
    switches: list[tuple[int, int, int]]
    atomic: list[str] = field(default_factory=list)
    steps: int = 0
    finding: str = ""
    kernel: str = DEFAULT_PROFILE

    def encode(self) -> str:
        doc = {"s": self.scenario, "b": self.bugs, "p": self.params, "w": [list(w) for w in self.switches],
               "a": self.atomic, "t": self.steps, "f": self.finding}
        if self.kernel != DEFAULT_PROFILE:
            doc["k"] = self.kernel                   # tokens of the default profile stay as they were
        raw = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "Token":
        """The token's fields, each checked (type, range, size); ValueError in one line for anything else."""
        t = text.strip()
        if t.startswith("shx1-"):
            raise ValueError("this token was made by an older shmmmu (shx1-): run its search again for a new one")
        if not t.startswith(TOKEN_PREFIX):
            raise ValueError(f"not a replay token (they start with {TOKEN_PREFIX})")
        if len(t) > MAX_TOKEN_CHARS:
            raise _damaged(f"longer than {MAX_TOKEN_CHARS} characters")
        body = t[len(TOKEN_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            z = zlib.decompressobj()
            text_json = z.decompress(raw, MAX_TOKEN_JSON)
            if z.unconsumed_tail:
                raise _damaged(f"it decompresses to more than {MAX_TOKEN_JSON} bytes")
            doc = json.loads(text_json, parse_constant=lambda c: (_ for _ in ()).throw(_damaged(c)))
        except ValueError as e:
            raise e if str(e).startswith("the replay token") else _damaged("not base64, zlib and JSON") from None
        except (zlib.error, RecursionError):
            raise _damaged("not base64, zlib and JSON") from None
        if type(doc) is not dict:
            raise _damaged("not an object")
        try:
            w = doc["w"]
            if type(w) is not list or len(w) > MAX_SWITCHES:
                raise _damaged(f"the switches must be a list of at most {MAX_SWITCHES}")
            switches = []
            for x in w:
                if type(x) is not list or len(x) != 3:
                    raise _damaged("each switch is [step, k, actor]")
                switches.append((_int(x[0], 0, MAX_STEPS, "a switch's step"), _int(x[1], -1, 1 << 20, "a switch's k"),
                                 _int(x[2], 0, 31, "a switch's actor")))
            params = doc["p"]
            if type(params) is not dict or len(params) > 16:
                raise _damaged("the parameters must be an object")
            for k, v in params.items():
                _str(k, "a parameter's name")
                _int(v, -(1 << 62), 1 << 62, f"the parameter {k}")
            kernel = _str(doc.get("k", DEFAULT_PROFILE), "the kernel")
            if kernel not in PROFILE_NAMES:
                raise _damaged(f"kernel {kernel!r} is none of {', '.join(PROFILE_NAMES)}")
            return cls(_str(doc["s"], "the scenario"), _strs(doc["b"], "the bug switches"), dict(params), switches,
                       _strs(doc["a"], "the atomic functions"), _int(doc["t"], 0, MAX_STEPS, "the steps"),
                       _str(doc["f"], "the finding"), kernel)
        except KeyError as e:
            raise _damaged(f"no field {e.args[0]!r}") from None
