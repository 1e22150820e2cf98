"""The one rule for names users give files: LoRA save names (Fuse, Train's lora_name) and run names.

A name is a plain file name or a sub-folder path below the folder it is saved in, e.g. `fused` or
`experiments/run 1`. What would leave that folder, break a file system or a one-line report is refused
with a message that says what was wrong and what to use instead.
"""
from __future__ import annotations

import unicodedata
from typing import Any

from .types import LoraFileError

SUFFIX = ".safetensors"  # added to the last part: it counts against the file-name limit
MAX_NAME = 255  # characters in the whole name
MAX_PART_BYTES = 255 - len(SUFFIX)  # one path part, UTF-8 bytes: file systems allow 255 for a file name
# Not allowed in file names on Windows (ComfyUI runs there too); ':' would also name a drive.
RESERVED = '<>:"|?*'
# Control characters (line breaks, NUL, ...), invisible format characters (e.g. right-to-left overrides),
# lone surrogates, and the line / paragraph separators: they would split or disguise a report line.
REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
WHAT_TO_USE = "use letters, digits, spaces, '-', '_' and '.', with '/' between sub-folders"


class BadName(LoraFileError):
    """A save or run name that the rule refuses; the message says why."""


def _describe(ch: str) -> str:
    if ch == "\n":
        return "a line break"
    if ch == "\x00":
        return "a null character"
    return f"the character U+{ord(ch):04X} ({unicodedata.name(ch, 'a control character').lower()})"


def check_name(name: Any, what: str = "save name", folder: str = "the folder it is saved in") -> str:
    """The name with surrounding spaces removed, or BadName saying what is wrong with it (`folder`: where the
    name is saved, for the messages, e.g. 'models/loras')."""
    if not isinstance(name, str):
        raise BadName(f"The {what} must be text, not {type(name).__name__}.")
    raw = name.strip()
    if not raw:
        raise BadName(f"The {what} is empty: give a name such as 'my_lora' (or 'folder/my_lora').")
    bad = next((c for c in raw if unicodedata.category(c) in REFUSED_CATEGORIES), None)
    if bad is not None:
        raise BadName(f"The {what} {raw!r} contains {_describe(bad)}, which cannot be part of a file name: "
                      f"{WHAT_TO_USE}.")
    if len(raw) > MAX_NAME:
        raise BadName(f"The {what} is {len(raw)} characters long; at most {MAX_NAME} are allowed. Choose a "
                      "shorter name.")
    reserved = sorted({c for c in raw if c in RESERVED})
    if reserved:
        drive = " (':' also names a drive)" if ":" in reserved else ""
        raise BadName(f"The {what} {raw!r} contains {' '.join(reserved)}, which file names cannot hold on every "
                      f"system{drive}: {WHAT_TO_USE}.")
    if raw.startswith(("/", "\\")):
        raise BadName(f"The {what} {raw!r} is an absolute path: give a name inside {folder} (sub-folders "
                      "allowed, e.g. 'experiments/run1').")
    parts = raw.replace("\\", "/").split("/")
    if any(p.strip() in ("", ".", "..") for p in parts):
        raise BadName(f"The {what} {raw!r} has an empty, '.' or '..' part: give a plain name or a sub-folder path "
                      f"such as 'experiments/run1' (a name cannot leave {folder}).")
    long_part = next((p for p in parts if len(p.encode("utf-8")) > MAX_PART_BYTES), None)
    if long_part is not None:
        raise BadName(f"The {what} has a part of {len(long_part.encode('utf-8'))} bytes ({long_part[:20]}…); "
                      f"file systems allow {MAX_PART_BYTES} with the '{SUFFIX}' added. Choose a shorter name.")
    return raw
