"""Secrets of network outputs (HEC token, Elasticsearch password and API key, Forward shared key...).

On eptrace's command line a secret is readable by every process on the host, the sandbox included
(/proc/PID/cmdline). So each secret option NAME also has two other forms, which the README uses:
- NAME_file=PATH: the stripped contents of PATH, a regular file (no link followed) owned by root (or by the
  user running eptrace) that neither others can read nor group or others can write: e.g. root:root 0600,
  or root:eptrace 0640.
- NAME_env=VAR: the environment variable VAR (/proc/PID/environ is readable only by its owner).
secret_param() is the one place that reads them; redact() is applied to every error and log line.
"""
from __future__ import annotations

import os
import re
import stat

SECRET_OPTIONS = ("token", "password", "api_key", "shared_key")
SECRET_FORMS = ("", "_file", "_env")
MAX_SECRET_BYTES = 64 * 1024

# NAME=value in a query, and user:password@ in a URL.
_SECRET_VALUE = re.compile(r"(?<![A-Za-z0-9_])((?:%s)=)[^&#\s'\"]*" % "|".join(SECRET_OPTIONS))
_USERINFO = re.compile(r"(://)[^/@\s'\"?#]*@")


def redact(text: str) -> str:
    """text with every secret value of an output spec replaced by ***: options and user:password@."""
    return _USERINFO.sub(r"\1***@", _SECRET_VALUE.sub(r"\1***", text))


def option_names(name: str) -> tuple[str, ...]:
    """The option names that give the secret NAME: NAME, NAME_file, NAME_env."""
    return tuple(name + form for form in SECRET_FORMS)


def secret_param(params: dict[str, str], name: str, spec_label: str) -> str | None:
    """The secret NAME from an output's options: params[NAME], or the stripped contents of the file named by
    params[NAME_file], or the variable named by params[NAME_env]; None when none is given.
    Raises ValueError naming spec_label (the output, redacted), never the secret."""
    given = [key for key in option_names(name) if key in params]
    if len(given) > 1:
        raise ValueError(f"{spec_label}: give {name} once, as one of {', '.join(option_names(name))}")
    if not given:
        return None
    key = given[0]
    value = params[key]
    if key == name:
        return value
    if key == name + "_env":
        secret = os.environ.get(value)
        if secret is None:
            raise ValueError(f"{spec_label}: {key}: the environment variable {value!r} is not set")
        secret = secret.strip()
    else:
        secret = _read_secret_file(value, key, spec_label)
    if not secret:
        raise ValueError(f"{spec_label}: {key}: the {name} is empty")
    return secret


def _read_secret_file(path: str, key: str, spec_label: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == 40 else e.strerror      # ELOOP: O_NOFOLLOW met a link
        raise ValueError(f"{spec_label}: {key}: cannot read {path}: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{spec_label}: {key}: {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ValueError(f"{spec_label}: {key}: {path} is owned by uid {st.st_uid}, not root")
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
            raise ValueError(f"{spec_label}: {key}: {path} is readable or writable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        data = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"{spec_label}: {key}: {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{spec_label}: {key}: {path} is not UTF-8 text") from None
