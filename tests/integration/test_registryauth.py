"""Registry credentials are chosen as the kubelet chooses them, reload in place, and never leak."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_syncer.sandbox.processes import MissingComponent, free_port, stop_process, wait_until
from ops.logs import fields_of
from syncer.pulling.registryauth import (
    CredentialFile,
    CredentialFileError,
    Keyring,
    RegistryCredentials,
    image_name,
    match_key,
    parse_auths,
)
from syncer.runtime.cri import RegistryAuth

SECRET = "s3cr3t-Pa55w0rd"
TOKEN = "id-token-0123456789"


def _b64(text: str, pad: bool = True) -> str:
    encoded = base64.b64encode(text.encode()).decode()
    return encoded if pad else encoded.rstrip("=")


def _config(auths: dict[str, Any]) -> bytes:
    return json.dumps({"auths": auths}).encode()


def _username(auth: RegistryAuth | None) -> str:
    assert auth is not None, "no credentials for the image"
    return auth.username


def _user_for(auths: dict[str, dict[str, str]], image: str) -> list[str]:
    """The usernames the keyring offers for ``image``, in order (the user names the entry)."""
    keyring = Keyring(parse_auths(_config(auths)))
    return [e.username for e in keyring.lookup(image_name(image))]


def _entry(user: str) -> dict[str, str]:
    return {"username": user, "password": SECRET}


# --- Matching, as pkg/credentialprovider/keyring.go does it -----------------------------------

MATCH_CASES = [
    # (auths keys -> user, image, expected users in order)
    ({"quay.io": "q"}, "quay.io/team/app:1", ["q"]),
    ({"https://quay.io": "q"}, "quay.io/team/app", ["q"]),
    ({"http://quay.io/v1/": "q"}, "quay.io/team/app", ["q"]),
    ({"https://quay.io/v2/": "q"}, "quay.io/team/app", ["q"]),
    ({"quay.io/team": "t"}, "quay.io/team/app", ["t"]),
    ({"quay.io/team": "t"}, "quay.io/other/app", []),
    # Most specific first, every match offered (the kubelet tries each in turn).
    ({"quay.io": "q", "quay.io/team": "t"}, "quay.io/team/app", ["t", "q"]),
    ({"quay.io": "q"}, "quay.io.evil.com/app", []),
    ({"*.example.com": "w"}, "eu.example.com/app", ["w"]),
    ({"*.example.com": "w"}, "example.com/app", []),
    ({"*.example.com": "w"}, "a.b.example.com/app", []),
    ({"*.*.example.com": "w"}, "a.b.example.com/app", ["w"]),
    ({"registry.local:5000": "p"}, "registry.local:5000/app", ["p"]),
    ({"registry.local:5000": "p"}, "registry.local:5001/app", []),
    ({"registry.local": "p"}, "registry.local:5000/app", []),
    ({"127.0.0.1:5000": "ip"}, "127.0.0.1:5000/game/server:2", ["ip"]),
    ({"https://127.0.0.1:5000/v2/": "ip"}, "127.0.0.1:5000/game/server", ["ip"]),
    # Docker Hub and its aliases.
    ({"https://index.docker.io/v1/": "hub"}, "nginx", ["hub"]),
    ({"https://index.docker.io/v1/": "hub"}, "library/nginx:1.27", ["hub"]),
    ({"index.docker.io": "hub"}, "myorg/game:1", ["hub"]),
    ({"docker.io": "hub"}, "myorg/game:1", ["hub"]),
    ({"docker.io": "hub"}, "docker.io/myorg/game", ["hub"]),
    ({"registry-1.docker.io": "hub"}, "index.docker.io/myorg/game", ["hub"]),
    ({"docker.io/myorg": "org", "https://index.docker.io/v1/": "hub"}, "myorg/game", ["org"]),
    ({"https://index.docker.io/v1/": "hub"}, "quay.io/myorg/game", []),
    ({"https://index.docker.io/v1/": "hub"}, "localhost:5000/game", []),
    (
        {"gcr.io": "g", "us-docker.pkg.dev": "ar"},
        "us-docker.pkg.dev/proj/repo/img@sha256:" + "a" * 64,
        ["ar"],
    ),
]


@pytest.mark.parametrize(("keys", "image", "expected"), MATCH_CASES)
def test_entry_is_chosen_like_the_kubelet(
    keys: dict[str, str], image: str, expected: list[str]
) -> None:
    auths = {key: _entry(user) for key, user in keys.items()}
    assert _user_for(auths, image) == expected


@pytest.mark.parametrize(
    ("location", "key"),
    [
        ("quay.io", "quay.io"),
        ("https://quay.io/", "quay.io"),
        ("https://index.docker.io/v1/", "index.docker.io"),
        ("http://registry:5000/v2/team", "registry:5000/team"),
        ("quay.io/team/app", "quay.io/team/app"),
    ],
)
def test_match_keys_drop_scheme_and_api_version(location: str, key: str) -> None:
    assert match_key(location) == key


def test_auth_field_wins_over_username_and_password_padded_or_not() -> None:
    for pad in (True, False):
        auths = {"r.io": {"auth": _b64(f"robot:{SECRET}x", pad), "username": "u", "password": "p"}}
        (entry,) = parse_auths(_config(auths))
        assert (entry.username, entry.password) == ("robot", f"{SECRET}x")


def test_tokens_reach_the_auth_config_and_server_address_stays_empty() -> None:
    auths = {"r.io": {"identitytoken": TOKEN, "registrytoken": "reg-tok"}}
    (entry,) = parse_auths(_config(auths))
    assert entry.auth() == RegistryAuth(identity_token=TOKEN, registry_token="reg-tok")


def test_pull_secret_comes_before_the_node_config(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    node = tmp_path / "config.json"
    secret.write_bytes(_config({"quay.io": _entry("from-secret")}))
    node.write_bytes(_config({"quay.io": _entry("from-node"), "gcr.io": _entry("node-gcr")}))
    creds = RegistryCredentials.from_paths(str(secret), str(node))
    assert [a.username for a in creds.for_image("quay.io/a/b:1")] == ["from-secret", "from-node"]
    assert _username(creds.first_for("gcr.io/x/y")) == "node-gcr"
    assert creds.first_for("ghcr.io/x/y") is None
    assert creds.for_image("NOT a reference") == []


# --- Reloading and bad files ------------------------------------------------------------------


def _mount_like_a_secret(directory: Path, content: bytes, version: int) -> None:
    """What the kubelet does to a mounted Secret: new data dir, then an atomic symlink swap."""
    data = directory / f"..{version}"
    data.mkdir()
    (data / ".dockerconfigjson").write_bytes(content)
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, directory / "..data")
    target = directory / ".dockerconfigjson"
    if not target.is_symlink():
        target.symlink_to("..data/.dockerconfigjson")


def test_a_mounted_secret_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    _mount_like_a_secret(tmp_path, _config({"quay.io": _entry("first")}), 1)
    creds = RegistryCredentials.from_paths(str(tmp_path / ".dockerconfigjson"))
    assert _username(creds.first_for("quay.io/a")) == "first"
    _mount_like_a_secret(tmp_path, _config({"quay.io": _entry("second")}), 2)
    assert _username(creds.first_for("quay.io/a")) == "second"


BAD_FILES = [
    (b'{"auths": {"r.io": {"password": "' + SECRET.encode() + b'"', "not valid JSON at line 1"),
    (SECRET.encode(), "not valid JSON"),
    (json.dumps({"r.io": {"password": SECRET}}).encode(), 'no "auths" object'),
    (_config({"r.io": {"auth": SECRET + "!!"}}), "auth is not base64"),
    (_config({"r.io": {"auth": _b64(SECRET)}}), "not base64(user:password)"),
    (json.dumps({"auths": {"r.io": {"password": [SECRET]}}}).encode(), "password is not a string"),
    (b"\xff\xfe" + SECRET.encode(), "not UTF-8"),
]


@pytest.mark.parametrize(("content", "problem"), BAD_FILES)
def test_a_bad_file_is_one_clear_line_without_its_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, problem: str
) -> None:
    path = tmp_path / "auth.json"
    path.write_bytes(content)
    file = CredentialFile(path, "registry-auth-file")
    with caplog.at_level(logging.DEBUG, logger="syncer.pulling.registryauth"):
        for _ in range(3):
            assert len(file.keyring()) == 0
    (record,) = caplog.records
    fields = fields_of(record)
    assert record.levelno == logging.WARNING
    assert fields["file"] == str(path)
    assert problem in fields["problem"]
    assert problem in str(file.problem)
    _assert_no_secret(caplog, file, fields)


def test_a_missing_file_is_reported_once_and_picked_up_when_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "auth.json"
    creds = RegistryCredentials.from_paths(str(path))
    with caplog.at_level(logging.INFO, logger="syncer.pulling.registryauth"):
        assert creds.for_image("quay.io/a") == []
        assert creds.for_image("quay.io/a") == []
        path.write_bytes(_config({"quay.io": _entry("late")}))
        assert _username(creds.first_for("quay.io/a")) == "late"
        path.write_bytes(b"{broken")
        assert creds.for_image("quay.io/a") == []
    messages = [(r.getMessage(), fields_of(r).get("problem")) for r in caplog.records]
    assert messages == [
        ("registry credentials unusable, pulling without them", "No such file or directory"),
        ("registry credentials loaded", None),
        ("registry credentials unusable, pulling without them", messages[2][1]),
    ]
    assert "not valid JSON" in str(messages[2][1])


def test_no_secret_in_any_repr_str_log_or_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "auth.json"
    path.write_bytes(
        _config(
            {
                "quay.io": {"auth": _b64(f"robot:{SECRET}")},
                "gcr.io": {"username": "_json_key", "password": SECRET, "identitytoken": TOKEN},
            }
        )
    )
    with caplog.at_level(logging.DEBUG, logger="syncer.pulling.registryauth"):
        creds = RegistryCredentials.from_paths(str(path), str(tmp_path / "missing.json"))
        auths = creds.for_image("quay.io/a") + creds.for_image("gcr.io/b")
        assert [a.password for a in auths] == [SECRET, SECRET]
        file = CredentialFile(path, "x")
        keyring = file.keyring()
        entries = keyring.lookup("quay.io/a") + keyring.lookup("gcr.io/b")
        errors = []
        for bad in (
            _config({"r": {"auth": SECRET}}),
            _config({"r": {"auth": _b64(SECRET)}}),
            b"{" + SECRET.encode(),
        ):
            with pytest.raises(CredentialFileError) as caught:
                parse_auths(bad)
            errors.append(caught.value)
    _assert_no_secret(caplog, creds, file, keyring, *entries, *auths, *errors)


def _assert_no_secret(caplog: pytest.LogCaptureFixture, *objects: object) -> None:
    shown = [caplog.text]
    for record in caplog.records:
        shown += [record.getMessage(), repr(fields_of(record))]
    for obj in objects:
        shown += [str(obj), repr(obj)]
        if isinstance(obj, BaseException):
            shown += [repr(obj.__cause__), repr(obj.__context__)]
    for text in shown:
        assert SECRET not in text
        assert TOKEN not in text
        assert _b64(f"robot:{SECRET}") not in text


# --- Every part of the state, not only the headline ---------------------------------------------


def _lookup(keys: dict[str, str], name: str) -> list[str]:
    """Users offered for a repository name as given (not normalized first)."""
    keyring = Keyring(parse_auths(_config({key: _entry(user) for key, user in keys.items()})))
    return [e.username for e in keyring.lookup(name)]


@pytest.mark.parametrize(
    ("keys", "name", "expected"),
    [
        # Go's net.SplitHostPort on a bracketed IPv6 host: the port must be equal, the host too.
        ({"[fd00::1]:5000": "v6"}, "[fd00::1]:5000/game", ["v6"]),
        ({"[fd00::1]:5000": "v6"}, "[fd00::1]:6000/game", []),
        ({"[fd00::1]:5000": "v6"}, "[ad00::1]:5000/game", []),
        ({"[fd00::1]:5000": "v6"}, "[fd00::1]/game", []),
        # No port after the bracket: SplitHostPort fails, so the kubelet globs the bracketed host
        # as it is, and its brackets make a character class that matches no host: never matched.
        ({"[fd00::1]": "v6"}, "[fd00::1]/game", []),
        ({"[fd00::1]": "v6"}, "[fd00::1]:5000/game", []),
        # A port is compared as a port, not globbed as part of the last label.
        ({"registry.*": "glob"}, "registry.local/game", ["glob"]),
        ({"registry.*": "glob"}, "registry.local:5000/game", []),
        # The Docker Hub fallback, for names spelled as the kubelet may see them.
        ({"registry-1.docker.io": "hub"}, "index.docker.io/myorg/game", ["hub"]),
        ({"registry-1.docker.io": "hub"}, "docker.io/myorg/game", ["hub"]),
        # A first component without '.' or ':' is a Hub user, not a host (as Docker decides).
        ({"index.docker.io": "hub"}, "myorg/game", ["hub"]),
        ({"index.docker.io": "hub"}, "registry.local/game", []),
        ({"index.docker.io": "hub"}, "registry:5000/game", []),
        ({"index.docker.io": "hub"}, "/game", []),
    ],
)
def test_lookup_by_repository_name(keys: dict[str, str], name: str, expected: list[str]) -> None:
    assert _lookup(keys, name) == expected


@pytest.mark.parametrize(
    ("user_password", "pad"),
    [
        # Base64 of lengths 1, 2 and 0 modulo 3: two, one and no padding characters to restore.
        ("robot:pa:ss", True),
        ("robot:pa:ss", False),
        ("robot:pa:s", False),
        ("robot:pa:sss", False),
    ],
)
def test_auth_splits_at_the_first_colon_padded_or_not(user_password: str, pad: bool) -> None:
    # Usernames cannot hold a colon, passwords can (the kubelet: strings.SplitN(..., ":", 2)).
    (entry,) = parse_auths(_config({"r.io": {"auth": _b64(user_password, pad)}}))

    assert (entry.username, entry.password) == tuple(user_password.split(":", 1))


def test_auth_with_a_character_outside_base64_is_refused() -> None:
    encoded = _b64("robot:secret")
    tampered = encoded[:4] + "!" + encoded[4:]

    with pytest.raises(CredentialFileError) as raised:
        parse_auths(_config({"r.io": {"auth": tampered}}))

    assert str(raised.value) == "auths entry 'r.io': auth is not base64"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"\xff", "not valid JSON: not UTF-8"),
        (b'{"a":', "not valid JSON at line 1 column 6: Expecting value"),
        (b"[]", 'no "auths" object (expected a dockerconfigjson document)'),
        (b'{"auths": []}', 'no "auths" object (expected a dockerconfigjson document)'),
        (_config({"r.io": 5}), "auths entry 'r.io' is not an object"),
        (_config({"r.io": {"username": 5}}), "auths entry 'r.io': username is not a string"),
        (
            _config({"r.io": {"auth": _b64("robot")}}),
            "auths entry 'r.io': auth is not base64(user:password)",
        ),
        (
            _config({"https://[bad": {}}),
            "registry key 'https://[bad' is not a URL: Invalid IPv6 URL",
        ),
    ],
)
def test_parse_errors_are_exact(content: bytes, error: str) -> None:
    with pytest.raises(CredentialFileError) as raised:
        parse_auths(content)

    assert str(raised.value) == error


def test_image_name_refuses_with_the_reference_and_the_reason() -> None:
    with pytest.raises(ValueError) as raised:
        image_name("NOT a reference")

    assert str(raised.value).startswith("invalid image reference 'NOT a reference': ")
    assert "must be lowercase" in str(raised.value)


def test_a_credential_file_before_and_after_loading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "auth.json"
    path.write_bytes(_config({"quay.io": _entry("q"), "gcr.io": _entry("g")}))
    file = CredentialFile(path, "registry-auth-file")

    assert file.problem is None
    assert repr(file) == f"CredentialFile(path={str(path)!r}, what='registry-auth-file', keys=0)"
    with caplog.at_level(logging.INFO, logger="syncer.pulling.registryauth"):
        assert len(file.keyring()) == 2
        assert len(file.keyring()) == 2
    assert repr(file) == f"CredentialFile(path={str(path)!r}, what='registry-auth-file', keys=2)"
    assert file.problem is None
    (record,) = caplog.records
    assert (record.getMessage(), record.levelno) == ("registry credentials loaded", logging.INFO)
    assert fields_of(record) == {
        "file": str(path),
        "source": "registry-auth-file",
        "registries": 2,
    }


def test_a_missing_file_is_a_problem_from_the_first_lookup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "missing.json"
    file = CredentialFile(path, "kubelet-config-json")

    with caplog.at_level(logging.INFO, logger="syncer.pulling.registryauth"):
        assert len(file.keyring()) == 0
    assert file.problem == "No such file or directory"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert fields_of(record) == {
        "file": str(path),
        "source": "kubelet-config-json",
        "problem": "No such file or directory",
    }


def test_a_file_that_cannot_be_read_is_a_problem(tmp_path: Path) -> None:
    # stat() succeeds, reading does not.
    file = CredentialFile(tmp_path, "registry-auth-file")

    assert len(file.keyring()) == 0
    assert file.problem == "Is a directory"


def test_credentials_say_which_source_each_file_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret, node = tmp_path / "secret.json", tmp_path / "config.json"
    secret.write_bytes(_config({"quay.io": _entry("s")}))
    node.write_bytes(_config({"quay.io": _entry("n")}))

    assert not RegistryCredentials()
    assert not RegistryCredentials.from_paths(None, "")
    creds = RegistryCredentials.from_paths(str(secret), str(node))
    assert creds
    with caplog.at_level(logging.INFO, logger="syncer.pulling.registryauth"):
        assert [a.username for a in creds.for_image("quay.io/a")] == ["s", "n"]
    assert [(fields_of(r)["file"], fields_of(r)["source"]) for r in caplog.records] == [
        (str(secret), "registry-auth-file"),
        (str(node), "kubelet-config-json"),
    ]
    assert [
        a.username for a in RegistryCredentials.from_paths(None, str(node)).for_image("quay.io/a")
    ] == ["n"]


# --- Against a real registry with htpasswd auth -----------------------------------------------


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingComponent(f"{name} not found; install it with `apt-get install {package}`")
    return path


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[str]:
    """A docker-registry on loopback requiring basic auth for user/pass; yields host:port."""
    registry = _binary("docker-registry", "docker-registry")
    htpasswd = _binary("htpasswd", "apache2-utils")
    users = tmp_path / "htpasswd"
    made = subprocess.run(
        [htpasswd, "-Bbn", "robot", SECRET], check=True, capture_output=True, text=True
    )
    users.write_text(made.stdout)
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "warn"},
                "storage": {"filesystem": {"rootdirectory": str(tmp_path / "store")}},
                "http": {"addr": f"127.0.0.1:{port}"},
                "auth": {"htpasswd": {"realm": "test", "path": str(users)}},
            }
        )
    )
    log_file = tmp_path / "registry.log"
    with log_file.open("wb") as out:
        process = subprocess.Popen(
            [registry, "serve", str(config)], stdout=out, stderr=out, start_new_session=True
        )
    host = f"127.0.0.1:{port}"
    try:
        wait_until(
            lambda: _v2_status(host, None) == 401,
            timeout=30,
            what="docker-registry",
            process=process,
            log_file=log_file,
        )
        yield host
    finally:
        stop_process(process)


def _v2_status(host: str, auth: RegistryAuth | None) -> int:
    request = urllib.request.Request(f"http://{host}/v2/")
    if auth is not None:
        basic = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            result: int = response.status
            return result
    except urllib.error.HTTPError as e:
        return e.code


def test_derived_credentials_open_a_real_registry(auth_registry: str, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_bytes(_config({f"https://{auth_registry}/v2/": {"auth": _b64(f"robot:{SECRET}")}}))
    bad.write_bytes(_config({auth_registry: {"username": "robot", "password": "wrong"}}))
    image = f"{auth_registry}/game/server:1.0"

    right = RegistryCredentials.from_paths(str(good)).first_for(image)
    wrong = RegistryCredentials.from_paths(str(bad)).first_for(image)
    assert right is not None and wrong is not None
    assert _v2_status(auth_registry, right) == 200
    assert _v2_status(auth_registry, wrong) == 401
    assert _v2_status(auth_registry, None) == 401
    # Another port on the same host is another registry: no credentials offered.
    other = f"127.0.0.1:{free_port()}/game/server:1.0"
    assert RegistryCredentials.from_paths(str(good)).first_for(other) is None
