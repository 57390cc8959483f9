"""What a file is by its first bytes, for files mistaken for safetensors.

A safetensors file starts with the little-endian length of its JSON header;
read as that, the first bytes of a zip, a pickle, a config.json or a Git
LFS pointer give an absurd length. :func:`looks_like` names what they are
instead, so the error can say "this is JSON", not "header length 7165...".
"""

from __future__ import annotations

# Magic numbers of files often mistaken for safetensors, and what they are.
_MAGIC = (
    (b"PK\x03\x04", "a zip archive (a PyTorch .bin/.pt checkpoint saved by torch.save?)"),
    (b"\x1f\x8b", "gzip-compressed"),
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"\x89HDF", "an HDF5 file (Keras .h5?)"),
    (b"\x93NUMPY", "a numpy .npy file"),
)


def _json_value_start(rest: str) -> bool:
    """Could ``rest`` (what follows a ``[``, maybe cut short) start a JSON
    array's first value? ``[build-system]`` (TOML) cannot."""
    if not rest or rest[0] in '"{[]-0123456789':
        return True
    return any(w.startswith(rest[:5]) or rest.startswith(w) for w in ("true", "false", "null"))


def looks_like(prefix: bytes) -> str | None:
    """What the first bytes say the file is, when they say."""
    head = bytes(prefix[:8])
    what = next((w for magic, w in _MAGIC if head.startswith(magic)), None)
    if what is None and head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        what = "a pickle (a PyTorch .bin checkpoint?)"  # pickle PROTO opcode
    if what is not None or not head:
        return what
    # A safetensors length prefix has zero high bytes, so never reads as text.
    text = head.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "ignore")
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        body = text.lstrip()
        if body[:1] == "{":
            return "JSON (it starts with '{': a config.json or an index.json?)"
        if body[:1] == "[" and _json_value_start(body[1:].lstrip()):
            return "JSON (it starts with '[')"
        return f"text (it starts with {text!r})"
    return None
