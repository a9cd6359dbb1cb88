"""Secrets in output specs: given inline (NAME=) or, better, read from a file (NAME_file=)."""
from __future__ import annotations


def secret_param(params: dict[str, str], name: str, spec_label: str) -> str | None:
    """params[name], or the stripped contents of the file params[name + '_file'], or None.

    Both given, or an unreadable or empty file, is a ValueError naming spec_label and the
    file, never the secret itself.
    """
    inline, path = params.get(name), params.get(f"{name}_file")
    if inline is not None and path is not None:
        raise ValueError(f"{spec_label}: give {name} or {name}_file, not both")
    if path is None:
        return inline
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{spec_label}: cannot read {name}_file {path!r}: "
                         f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    if not value:
        raise ValueError(f"{spec_label}: {name}_file {path!r} is empty")
    return value
