"""Append-only audit log of predictions: one JSON line per prediction, never raw PII.

Each line holds the UTC time, the model hash, a sha256 of the canonical JSON of the inputs (the
inputs themselves are never written), the output (label and probabilities) and a summary of the
explanation. Every string, mapping key and integer in what is written passes through the
redactor first. Explanations list tokens, and a tokenizer splits "jane.doe@bank.com", a name or
an IP address into pieces that no pattern recognises on their own ("##doe", "168", "."), so no
token that is part of PII found in the inputs is written:
- a token given with its place, `{"token": "##doe", "start": 5, "end": 8, ...}` (character
  offsets into `inputs["text"]`, as `infer.explain.token_offsets` gives them), is replaced by the
  placeholder of any finding its characters overlap, whatever its length ("." and "1" included),
  provided `text[start:end]` is that token; tokens elsewhere in the text stay, so the year "2024"
  of a headline is kept while the "2024" of a date of birth is masked;
- any other explanation string (a token without offsets, or whose offsets do not fit) is
  replaced when it could be a piece of such PII: its letters and digits (2 or more) occur in one,
  or, with fewer, its characters do ("." of an e-mail, "-" of a sort code).

Writes are line-atomic: the file is opened with O_APPEND and each entry is one `os.write` of a
complete line, under a lock shared by the threads using this `AuditLog`. Other processes (or
other `AuditLog` objects) appending to the same file rely on O_APPEND alone, which keeps lines
whole on local file systems. `fsync=True` makes each entry durable before `record` returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fingpt_federated.privacy.redaction import Match, Redactor, map_strings, placeholder

OWNER_ONLY = 0o600
SUBWORD_MARKERS = ("##", "Ġ", "▁")
MIN_FRAGMENT_CHARS = 2
_NOT_ALNUM = re.compile(r"[\W_]+")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _json_default(value: Any) -> Any:
    """Arrays and numpy scalars hash by their values, not by their repr."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable; convert it before auditing")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text: the same inputs always give the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def input_hash(inputs: Any) -> str:
    """sha256 of the canonical JSON of the inputs, as hex."""
    return hashlib.sha256(canonical_json(inputs).encode("utf-8")).hexdigest()


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _pii_in(findings: Mapping[str, list[Match]]) -> dict[str, str]:
    """Every piece of PII found in the input strings (case-folded, without subword markers or
    accents) and its kind."""
    return {_surface(text[m.start : m.end]): m.kind for text, matches in findings.items() for m in matches}


def _surface(text: str) -> str:
    """How a tokenizer may write `text`: no subword markers, case-folded, accents dropped."""
    for marker in SUBWORD_MARKERS:
        text = text.replace(marker, "")
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).strip()


def _normalise(text: str) -> str:
    return _NOT_ALNUM.sub("", _surface(text))


def _fragment_masker(pii: Mapping[str, str]) -> Callable[[str], str]:
    """Replace a string that could be a piece of PII from the inputs: its letters and digits (2 or
    more) occur in one, or, with fewer, its characters do.

    Applied to strings only: integers in an explanation are counts and positions, and most
    short ones would be digits of some phone or card number.
    """
    cores = {_NOT_ALNUM.sub("", value): kind for value, kind in pii.items()}
    longest = max(map(len, cores), default=0)

    def mask(token: str) -> str:
        core, surface = _normalise(token), _surface(token)
        if len(core) >= MIN_FRAGMENT_CHARS:
            found = core if len(core) <= longest else None
            kinds = [kind for value, kind in cores.items() if found and found in value]
        else:
            kinds = [kind for value, kind in pii.items() if surface and surface in value]
        return placeholder(kinds[0]) if kinds else token

    return mask


def _located(item: Mapping[str, Any], text: str | None) -> tuple[int, int] | None:
    """The span of an explanation token given with offsets that fit the text, else None."""
    token, start, end = item.get("token"), item.get("start"), item.get("end")
    if text is None or not isinstance(token, str) or not isinstance(start, int) or not isinstance(end, int):
        return None
    if isinstance(start, bool) or isinstance(end, bool) or not 0 <= start < end <= len(text):
        return None
    return (start, end) if _normalise(token) == _normalise(text[start:end]) else None


def _mask_tokens(value: Any, text: str | None, findings: list[Match], mask: Callable[[str], str]) -> Any:
    """The explanation with located tokens masked by overlap and every other string by `mask`."""
    if isinstance(value, Mapping):
        span = _located(value, text)
        result: dict[Any, Any] = {}
        for key, item in value.items():
            if span is not None and key == "token":
                hits = [m.kind for m in findings if m.start < span[1] and span[0] < m.end]
                result[key] = placeholder(hits[0]) if hits else item
            else:
                new_key = mask(key) if isinstance(key, str) else key
                result[new_key] = _mask_tokens(item, text, findings, mask)
        return result
    if isinstance(value, list | tuple):
        return [_mask_tokens(item, text, findings, mask) for item in value]
    return mask(value) if isinstance(value, str) else value


def _checked_output(output: Mapping[str, Any]) -> Mapping[str, Any]:
    missing = {"label", "probabilities"} - set(output)
    if missing:
        raise ValueError(f"prediction output lacks {sorted(missing)}; an audit entry needs the label and probabilities")
    return output


class AuditLog:
    """An append-only JSON-lines file of predictions, safe to share between threads."""

    def __init__(
        self,
        path: str | Path,
        *,
        redactor: Redactor | None = None,
        fsync: bool = False,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.redactor = redactor or Redactor()
        self.fsync = fsync
        self._clock = clock
        self._lock = threading.Lock()

    def record(
        self,
        model_hash: str,
        inputs: Any,
        output: Mapping[str, Any],
        explanation: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one prediction and return the entry exactly as written.

        Explanation tokens with "start"/"end" offsets are placed in `inputs["text"]`.
        """
        found = {string: self.redactor.find(string) for string in set(_strings(inputs))}
        mask = _fragment_masker(_pii_in(found))
        text = inputs.get("text") if isinstance(inputs, Mapping) else None
        text = text if isinstance(text, str) else None
        findings = found[text] if text is not None else []
        explained = map_strings(explanation, self.redactor.redact)
        entry = {
            "time": self._timestamp(),
            "model_hash": self.redactor.redact(model_hash),
            "input_hash": input_hash(inputs),
            "output": self.redactor.redact_record(_checked_output(output)),
            "explanation": _mask_tokens(explained, text, findings, mask),
        }
        line = json.dumps(entry, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
        self._append(line.encode("utf-8"))
        return json.loads(line)

    def _timestamp(self) -> str:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the audit clock must return timezone-aware datetimes")
        return now.astimezone(UTC).isoformat(timespec="microseconds")

    def _append(self, data: bytes) -> None:
        """One write of a whole line to an O_APPEND descriptor, so lines never interleave.

        A short write (a full disk, a signal) is continued under the lock rather than dropped.
        """
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, OWNER_ONLY)
            try:
                written = os.write(fd, data)
                while written < len(data):
                    written += os.write(fd, data[written:])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)


def read_audit_log(path: str | Path) -> list[dict[str, Any]]:
    """Every entry of an audit log, in order; a damaged line is an error naming its number."""
    entries = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{number}: an audit entry must be a JSON object")
            entries.append(entry)
    return entries
