"""What the command line lets a shared file reach: folders beyond its own, network endpoints,
and the environment variable whose value is sent as an API key.

The command line is trusted; a file someone else can hand you (a task file, a policy) is not.
Such a file may read only files inside its own folder (symlinks and `..` resolved), may not
send anything to the network, and may not choose an environment variable whose value leaves
the machine, unless the user's command line grants it: `--allow-files DIR` (more folders),
`--judge-endpoint URL` (an endpoint a task file's judge may call) and `--judge-api-key-env
NAME` (the variable whose value is that endpoint's bearer token); for a guard policy's
classifier, `--classifier-endpoint URL` and `--classifier-api-key-env NAME`. Every refusal is
one ConfigError line naming the file, line and key (the reader's own error type), and the
flag that would grant it (`Grants` carries the flags' names, so each command's own are named).

Not here: reading the files (each format's reader calls these checks), the HTTP client.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weightsmith.files import is_inside

__all__ = ["Fail", "Grants"]

#: Builds the reader's own error from a message (it adds the file, line and key).
Fail = Callable[[str], Exception]


def _same_url(a: str, b: str) -> bool:
    return a.strip().rstrip("/") == b.strip().rstrip("/")


@dataclass(frozen=True)
class Grants:
    """Access the command line grants shared files (the default grants nothing)."""

    folders: tuple[Path, ...] = ()  # --allow-files: folders any shared file may read from
    endpoints: tuple[str, ...] = ()  # --judge-endpoint: URLs a file's judge may call
    api_key_env: str | None = None  # --judge-api-key-env: the variable sent as a bearer token
    #: the flags that grant `endpoints` and `api_key_env`, as refusals name them
    endpoint_flag: str = "--judge-endpoint"
    api_key_flag: str = "--judge-api-key-env"

    def data_file(self, path: Path, own_folder: Path, fail: Fail) -> Path:
        """`path` if it lies in `own_folder` or a granted folder (after resolving symlinks), else
        `fail(message)` is raised (the reader's own error, naming its file, line and key)."""
        if is_inside(path, own_folder) or any(is_inside(path, folder) for folder in self.folders):
            return path
        target = Path(os.path.realpath(path))
        raise fail(
            f"data file {path} is outside the file's own folder; a shared file may read only files "
            f"beside it: pass --allow-files {target.parent} to allow that folder"
        )

    def endpoint(self, url: str, fail: Fail) -> None:
        """Refuse a network endpoint a file names unless the command line granted that URL."""
        if not any(_same_url(url, granted) for granted in self.endpoints):
            raise fail(
                f"a shared file cannot send requests to an endpoint it chooses ({url}); "
                f"pass {self.endpoint_flag} {url} to allow it"
            )

    def api_key_var(self, named_in_file: str | None, fail: Fail) -> str | None:
        """The variable whose value is sent as the API key: only the command line's. A file may
        repeat the granted name, never choose another one."""
        if named_in_file is not None and named_in_file != self.api_key_env:
            raise fail(
                f"a shared file cannot choose which environment variable is sent as an API key "
                f"({named_in_file}); remove the key and pass {self.api_key_flag} NAME"
            )
        return self.api_key_env
