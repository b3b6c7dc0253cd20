"""The [crowdsec] table: a link that can work or one line that says what to set, and secret files
that are root's alone and never quoted."""

from __future__ import annotations

import os

import pytest

from hybrid.errors import ConfigError
from hybrid.service import config as hcfg

pytestmark = pytest.mark.unit

SECRET = "Zk3vQ8yT1mN0pL5rW2xE7cB4"


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setattr(hcfg, "TOKEN_OWNER_UID", os.geteuid())
    (tmp_path / "rules.toml").write_text('default = "accept"\n')
    key = tmp_path / "key"
    key.write_text(SECRET + "\n")
    key.chmod(0o600)

    def write(table: str) -> str:
        p = tmp_path / "hybrid.toml"
        p.write_text('[attach]\ninterfaces = ["eth0"]\n[engine]\nrules = "rules.toml"\n[crowdsec]\n' + table)
        return str(p)
    return write, key


def error_of(path: str) -> str:
    with pytest.raises(hcfg.ConfigFileError) as exc:
        hcfg.load(path)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_a_bouncer(files):
    write, key = files
    cfg = hcfg.load(write(f'lapi_url = "http://127.0.0.1:8080/"\nbouncer_key_file = "{key}"\n'
                          'poll_interval = 0.5\norigins = ["crowdsec", "cscli"]\nnever_block = ["198.18.0.9/24"]\n'))
    assert cfg["crowdsec.lapi_url"] == "http://127.0.0.1:8080"
    assert cfg["crowdsec.poll_interval"] == 0.5 and cfg["crowdsec.scopes"] == ["ip", "range"]
    assert cfg["crowdsec.never_block"] == ["198.18.0.0/24"] and cfg["crowdsec.types"] == ["ban"]
    again = os.path.join(os.path.dirname(str(key)), "again.toml")
    with open(again, "w") as f:
        f.write(cfg.to_toml())
    assert hcfg.load(again).values == cfg.values                 # the effective configuration loads back


@pytest.mark.parametrize("table, words", [
    ('lapi_url = "ftp://x:21"\n', "write http://HOST:PORT"),
    ('lapi_url = "http://127.0.0.1:8080/?x=1"\n', "no ?query"),
    ('lapi_url = "http://user:pw@127.0.0.1:8080"\n', "credentials do not belong in the URL"),
    ('lapi_url = "http://127.0.0.1:99999"\n', "bad port"),
    ('lapi_url = "http://127.0.0.1:8080"\n', "neither bouncer_key_file"),
    ('bouncer_key_file = "KEY"\n', "lapi_url is not"),
    ('lapi_url = "http://127.0.0.1:8080"\nmachine_id = "gw1"\n', "go together"),
    ('lapi_url = "http://127.0.0.1:8080"\nmachine_id = "gw 1"\nmachine_password_file = "KEY"\n', "machine's name"),
    ('lapi_url = "http://127.0.0.1:8080"\nbouncer_key_file = "KEY"\npoll_interval = 0\n', "0.2 to 3600"),
    ('lapi_url = "http://127.0.0.1:8080"\nbouncer_key_file = "KEY"\nscopes = ["country"]\n', "write one of ip, range"),
    ('lapi_url = "http://127.0.0.1:8080"\nbouncer_key_file = "KEY"\ntypes = []\n', "the list is empty"),
    ('lapi_url = "http://127.0.0.1:8080"\nbouncer_key_file = "KEY"\nnever_block = ["x"]\n', "CIDR"),
    ('lapi_url = "http://127.0.0.1:8080"\nbouncer_key_file = "KEY"\nmin_prefix_v4 = 33\n', "0 to 32"),
    ('lapi_url = "http://127.0.0.1:8080"\nbouncer_key_file = "/nonexistent/key"\n', "No such file"),
])
def test_refused_in_one_line(files, table, words):
    write, key = files
    assert words in error_of(write(table.replace("KEY", str(key))))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_others_can_read_is_refused(files, mode):
    write, key = files
    key.chmod(mode)
    msg = error_of(write(f'lapi_url = "http://127.0.0.1:8080"\nbouncer_key_file = "{key}"\n'))
    assert f"has mode {mode:04o}" in msg and "chmod 600" in msg


def test_read_secret(files):
    _, key = files
    assert hcfg.read_secret(str(key), "bouncer_key_file") == SECRET.encode()


@pytest.mark.parametrize("text", ["", "Qx7Kp2 Vw9Lm4\n", "x" * 5000, "Rz8Yt3\tHn6Bv1\n"])
def test_a_bad_secret_is_refused_without_quoting_it(files, text):
    _, key = files
    key.write_text(text)
    with pytest.raises(ConfigError) as exc:
        hcfg.read_secret(str(key), "bouncer_key_file")
    msg = str(exc.value)
    assert "\n" not in msg and "bouncer_key_file" in msg
    for word in text.split():
        assert word not in msg
