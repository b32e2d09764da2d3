"""Registry credentials for pulls, found the way the kubelet finds them.

Private registries need credentials, and operators already have them in two shapes: a
``kubernetes.io/dockerconfigjson`` Secret (mounted into the syncer, ``--registry-auth-file``) and
the kubelet's own ``config.json`` on the host (``--kubelet-config-json``). Both are
``{"auths": {<key>: {auth, username, password, identitytoken, registrytoken}}}``.

An entry is chosen as the kubelet's keyring (``pkg/credentialprovider/keyring.go``) chooses it, so
a Secret that works for the kubelet works here: keys may carry a scheme and a path (``/v1/`` and
``/v2/`` mean "no path"), a key's path must prefix the image's path, ``*`` globs one host label
(``*.example.com``), ports must be equal, and Docker Hub images fall back to the
``index.docker.io`` entry. Every matching entry is returned, most specific first, so the caller
can try each in turn as the kubelet does.

Mounted Secrets change in place (an atomic symlink swap), so every lookup re-stats the files and
reloads what changed. A file that is missing or malformed is reported once, by path and problem,
never by content, and contributes no credentials until it is fixed. Credentials reach nothing but
the returned RegistryAuth: no log line, repr or exception text contains them.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from docker_image.reference import InvalidReference, Reference

from syncer.runtime.cri import RegistryAuth

__all__ = ["CredentialFile", "Keyring", "RegistryCredentials", "image_name"]

log = logging.getLogger(__name__)

# Docker Hub, as the kubelet names it in its fallback; registry-1.docker.io is the host Hub's
# API actually answers on, and people write it in config files too.
_DEFAULT_REGISTRY_KEYS = ("index.docker.io", "registry-1.docker.io")


class CredentialFileError(ValueError):
    """A credential file cannot be used; the text names the problem, never the content."""


@dataclass(frozen=True, repr=False)
class _Entry:
    """One ``auths`` entry: the match key and what to send. Repr shows the key only."""

    key: str
    username: str = field(default="")
    password: str = field(default="")
    identity_token: str = field(default="")
    registry_token: str = field(default="")

    def __repr__(self) -> str:
        return f"_Entry(key={self.key!r}, secrets=<redacted>)"

    def auth(self) -> RegistryAuth:
        # As the kubelet: ``auth`` is decoded into username/password, ServerAddress stays empty
        # (containerd rejects one that does not equal the host it resolved).
        return RegistryAuth(
            username=self.username,
            password=self.password,
            auth="",
            server_address="",
            identity_token=self.identity_token,
            registry_token=self.registry_token,
        )


def image_name(image: str) -> str:
    """The repository name the kubelet matches on: ``nginx:1`` -> ``docker.io/library/nginx``."""
    try:
        name: str = Reference.parse_normalized_named(image)["name"]
    except InvalidReference as e:
        raise ValueError(f"invalid image reference {image!r}: {e}") from e
    return name


class Keyring:
    """The entries of one or more ``auths`` maps, indexed like the kubelet's BasicDockerKeyring."""

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self._creds: dict[str, list[_Entry]] = {}
        for entry in entries:
            self._creds.setdefault(entry.key, []).append(entry)
        # Reverse-sorted so that "quay.io/team" is tried before "quay.io".
        self._index = sorted(self._creds, reverse=True)

    def __repr__(self) -> str:
        return f"Keyring(keys={self._index!r})"

    def __len__(self) -> int:
        return sum(len(v) for v in self._creds.values())

    def lookup(self, name: str) -> list[_Entry]:
        """Entries for a repository name (``registry/path``, no tag), most specific first."""
        found = [e for key in self._index if _urls_match(key, name) for e in self._creds[key]]
        if found or not _is_default_registry(name):
            return found
        return [e for key in _DEFAULT_REGISTRY_KEYS for e in self._creds.get(key, ())]


def match_key(location: str) -> str:
    """The kubelet's index key for an ``auths`` key: scheme dropped, ``/v1/`` ``/v2/`` ignored."""
    value = location if location.startswith(("https://", "http://")) else "https://" + location
    try:
        parsed = urlsplit(value)
    except ValueError as e:
        raise CredentialFileError(f"registry key {location!r} is not a URL: {e}") from e
    path = parsed.path
    if path.startswith(("/v2/", "/v1/")):
        path = path[3:]
    return parsed.netloc + path if path and path != "/" else parsed.netloc


def _split_host_port(netloc: str) -> tuple[list[str], str]:
    # Go's net.SplitHostPort; on its errors the kubelet uses the whole host and no port.
    host, port = netloc, ""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end != -1 and netloc[end + 1 : end + 2] == ":":
            host, port = netloc[1:end], netloc[end + 2 :]
    elif netloc.count(":") == 1:
        host, port = netloc.split(":")
    return host.split("."), port


def _urls_match(glob: str, target: str) -> bool:
    """The kubelet's URLsMatch: equal ports, equal label count, globbed labels, path prefix."""
    glob_url, target_url = urlsplit("https://" + glob), urlsplit("https://" + target)
    glob_parts, glob_port = _split_host_port(glob_url.netloc)
    target_parts, target_port = _split_host_port(target_url.netloc)
    if glob_port != target_port or len(glob_parts) != len(target_parts):
        return False
    if not target_url.path.startswith(glob_url.path):
        return False
    return all(fnmatch.fnmatchcase(t, g) for g, t in zip(glob_parts, target_parts, strict=True))


def _is_default_registry(name: str) -> bool:
    first, slash, _ = name.partition("/")
    if not first:
        return False
    if not slash or first in ("docker.io", "index.docker.io"):
        return True
    return not any(c in first for c in ".:")


def parse_auths(data: bytes) -> list[_Entry]:
    """The entries of a dockerconfigjson document; CredentialFileError says what is wrong."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        # JSONDecodeError's msg and position never quote the document; str(e) of others might.
        where = (
            f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        )
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise CredentialFileError(f"not valid JSON{where}: {reason}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("auths"), dict):
        raise CredentialFileError('no "auths" object (expected a dockerconfigjson document)')
    entries = []
    for location, ident in doc["auths"].items():
        entries.append(_entry(location, ident))
    return entries


def _entry(location: str, ident: object) -> _Entry:
    if not isinstance(ident, dict):
        raise CredentialFileError(f"auths entry {location!r} is not an object")
    fields = {}
    for name in ("username", "password", "auth", "identitytoken", "registrytoken"):
        value = ident.get(name, "")
        if not isinstance(value, str):
            raise CredentialFileError(f"auths entry {location!r}: {name} is not a string")
        fields[name] = value
    username, password = fields["username"], fields["password"]
    if fields["auth"]:
        username, password = _decode_auth(location, fields["auth"])
    return _Entry(
        key=match_key(location),
        username=username,
        password=password,
        identity_token=fields["identitytoken"],
        registry_token=fields["registrytoken"],
    )


def _decode_auth(location: str, value: str) -> tuple[str, str]:
    """``base64(user:password)``, padded or not, as the kubelet accepts it."""
    text = value.strip()
    try:
        decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise CredentialFileError(f"auths entry {location!r}: auth is not base64") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise CredentialFileError(f"auths entry {location!r}: auth is not base64(user:password)")
    return username, password


class CredentialFile:
    """One credential file, reloaded when it changes; a bad file yields no entries."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._stamp: tuple[int, int, int, int] | None = None
        self._problem: str | None = None
        self._keyring = Keyring()
        self._loaded = False

    def __repr__(self) -> str:
        keys = len(self._keyring)
        return f"CredentialFile(path={str(self.path)!r}, what={self.what!r}, keys={keys})"

    @property
    def problem(self) -> str | None:
        """Why the file yields no credentials right now, or None when it is fine."""
        return self._problem

    def keyring(self) -> Keyring:
        """The current entries, re-read first if the file changed since the last call."""
        try:
            st = self.path.stat()
        except OSError as e:
            if not self._loaded or self._stamp is not None:
                self._fail(e.strerror or type(e).__name__)
            self._stamp, self._loaded = None, True
            return self._keyring
        stamp = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)
        if not self._loaded or stamp != self._stamp:
            self._stamp, self._loaded = stamp, True
            self._load()
        return self._keyring

    def _load(self) -> None:
        try:
            entries = parse_auths(self.path.read_bytes())
        except OSError as e:
            self._fail(e.strerror or type(e).__name__)
            return
        except CredentialFileError as e:
            self._fail(str(e))
            return
        self._keyring, self._problem = Keyring(entries), None
        log.info(
            "registry credentials loaded",
            extra={"file": str(self.path), "source": self.what, "registries": len(entries)},
        )

    def _fail(self, problem: str) -> None:
        self._keyring, self._problem = Keyring(), problem
        log.warning(
            "registry credentials unusable, pulling without them",
            extra={"file": str(self.path), "source": self.what, "problem": problem},
        )


class RegistryCredentials:
    """Every configured source, in the kubelet's order: the pull Secret first, then the node's.

    ``for_image`` is what the puller calls; it is cheap (one ``stat`` per file) and never raises.
    """

    def __init__(self, files: Sequence[CredentialFile] = ()) -> None:
        self._files = list(files)

    @classmethod
    def from_paths(
        cls, auth_file: str | None = None, kubelet_config_json: str | None = None
    ) -> RegistryCredentials:
        files = []
        if auth_file:
            files.append(CredentialFile(auth_file, "registry-auth-file"))
        if kubelet_config_json:
            files.append(CredentialFile(kubelet_config_json, "kubelet-config-json"))
        return cls(files)

    def __repr__(self) -> str:
        return f"RegistryCredentials(files={self._files!r})"

    def __bool__(self) -> bool:
        return bool(self._files)

    def for_image(self, image: str) -> list[RegistryAuth]:
        """Credentials to try, in order, for pulling ``image``; empty means pull anonymously."""
        try:
            name = image_name(image)
        except ValueError:
            return []
        found: list[RegistryAuth] = []
        for file in self._files:
            for entry in file.keyring().lookup(name):
                auth = entry.auth()
                if auth not in found:
                    found.append(auth)
        return found

    def first_for(self, image: str) -> RegistryAuth | None:
        """The most specific credentials for ``image``, or None."""
        found = self.for_image(image)
        return found[0] if found else None
