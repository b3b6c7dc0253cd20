"""hybridctl doctor without privileges: line format, JSON shape, exit status, and the rule that a
check which raises becomes a line instead of stopping the others."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hybrid.cli import doctor as cli_doctor

from hybrid.observe import doctor as lib

pytestmark = pytest.mark.unit

OK_BCC = lib.Check("bcc compile", lib.OK, True, "0.5 s, headers /usr/src/linux-headers-6.1.0-56-amd64")
WARN_NATIVE = lib.Check("xdp native", lib.WARN, False, "attach to a veth failed: Operation not supported",
                        "use generic (skb) mode")
WARN_BPFFS = lib.Check("bpffs", lib.WARN, True, "not mounted", "mount -t bpf -o mode=0700 bpf /run/hybrid/bpffs")
FAIL_GENERIC = lib.Check("xdp generic", lib.FAIL, True, "attach to a veth failed: Invalid argument",
                         "generic XDP needs a kernel >= 4.12")
FAIL_LAB = lib.Check("lab tools", lib.FAIL, False, "RuntimeError: boom", "report this line")


def run_cli(monkeypatch, checks, *args):
    def fake_run_checks(on_result=None):
        for c in checks:
            if on_result:
                on_result(c)
        return list(checks)

    monkeypatch.setattr(lib, "run_checks", fake_run_checks)
    return CliRunner().invoke(cli_doctor.doctor, list(args))


def test_ok_line_has_status_name_and_detail():
    line = cli_doctor.format_check(OK_BCC)
    assert line == f"ok    {'bcc compile':<{cli_doctor.NAME_WIDTH}}  0.5 s, headers /usr/src/linux-headers-6.1.0-56-amd64"
    assert "fix" not in line


def test_failing_line_names_the_fix():
    line = cli_doctor.format_check(FAIL_GENERIC)
    assert line.startswith("FAIL  xdp generic")
    assert line.endswith("attach to a veth failed: Invalid argument -> fix: generic XDP needs a kernel >= 4.12")


def test_optional_warning_says_optional_and_fix():
    line = cli_doctor.format_check(WARN_NATIVE)
    assert line.startswith("warn  xdp native")
    assert "(optional) -> fix: use generic (skb) mode" in line


def test_plain_when_not_a_tty_colour_only_on_request():
    assert "\x1b[" not in cli_doctor.format_check(FAIL_GENERIC)
    assert "\x1b[" in cli_doctor.format_check(FAIL_GENERIC, color=True)


def test_details_line_up():
    checks = (OK_BCC, WARN_NATIVE, FAIL_GENERIC)
    cols = {cli_doctor.format_check(c).index(c.detail) for c in checks}
    assert len(cols) == 1


@pytest.mark.parametrize("checks, ok", [
    ([OK_BCC], True),
    ([OK_BCC, WARN_NATIVE, WARN_BPFFS], True),      # warnings, even of required checks, pass
    ([OK_BCC, FAIL_LAB], True),                      # an optional check failing does not
    ([OK_BCC, WARN_NATIVE, FAIL_GENERIC], False),
    ([], True),
])
def test_exit_code_and_json_agree(monkeypatch, checks, ok):
    human = run_cli(monkeypatch, checks)
    assert human.exit_code == (0 if ok else 1), human.output
    doc = run_cli(monkeypatch, checks, "--json")
    assert doc.exit_code == human.exit_code
    data = json.loads(doc.output)
    assert data["ok"] is ok
    assert lib.all_passed(checks) is ok


def test_json_shape(monkeypatch):
    result = run_cli(monkeypatch, [OK_BCC, FAIL_GENERIC], "--json")
    data = json.loads(result.output)  # nothing but the document on stdout
    assert set(data) == {"ok", "checks"}
    assert data["checks"][1] == {
        "name": "xdp generic", "status": "fail", "required": True,
        "detail": "attach to a veth failed: Invalid argument", "fix": "generic XDP needs a kernel >= 4.12",
    }
    assert [c["name"] for c in data["checks"]] == ["bcc compile", "xdp generic"]


def test_human_output_one_line_per_check_and_summary(monkeypatch):
    result = run_cli(monkeypatch, [OK_BCC, WARN_NATIVE, FAIL_GENERIC])
    lines = result.output.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("FAIL  xdp generic") and "-> fix: generic XDP needs" in lines[2]
    assert lines[3] == "doctor: 1 required check(s) failed: xdp generic"
    ok = run_cli(monkeypatch, [OK_BCC, WARN_NATIVE])
    assert ok.output.splitlines()[-1] == "doctor: all required checks passed (1 warning(s))"


def test_help_has_example_block():
    result = CliRunner().invoke(cli_doctor.doctor, ["--help"])
    assert result.exit_code == 0
    assert "  sudo .venv/bin/hybridctl doctor --json" in result.output
    assert "--json" in result.output


# --- the library's runner -----------------------------------------------------------------------

def test_raising_check_becomes_fail_line_and_others_run(monkeypatch):
    def boom(probe):
        raise RuntimeError("boom")

    def fine(probe):
        return lib.Check("fine", lib.OK, True, "all good")

    def refused(probe):
        raise lib.CheckFailed("nope", "do this")

    monkeypatch.setattr(lib, "CHECKS", [("boom", True, boom), ("fine", True, fine),
                                        ("refused", False, refused)])
    seen = []
    checks = lib.run_checks(on_result=seen.append)
    assert seen == checks
    assert checks[0] == lib.Check("boom", lib.FAIL, True, "RuntimeError: boom",
                                  "unexpected error inside the check: report this line")
    assert checks[1].status == lib.OK
    # an optional check that refuses is a warning, and keeps its fix
    assert checks[2] == lib.Check("refused", lib.WARN, False, "nope", "do this")
    assert not lib.all_passed(checks)


def test_keyboard_interrupt_is_not_swallowed(monkeypatch):
    def interrupted(probe):
        raise KeyboardInterrupt

    monkeypatch.setattr(lib, "CHECKS", [("x", True, interrupted)])
    with pytest.raises(KeyboardInterrupt):
        lib.run_checks()


def test_tools_missing_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(lib, "FALLBACK_PATH", str(tmp_path / "nowhere"))
    check = lib.check_tools(lib.Probe())
    assert check.status == lib.FAIL and check.required
    assert "iptables-restore" in check.detail
    assert "apt-get install iproute2 iptables util-linux" in check.fix
    lab = lib.check_lab_tools(lib.Probe())
    assert lab.status == lib.WARN and not lab.required
    assert "apt-get install curl iperf3 nginx-light wrk" in lab.fix


def test_tool_off_path_but_installed_says_so(monkeypatch, tmp_path):
    (tmp_path / "sbin").mkdir()
    tool = tmp_path / "sbin" / "nsenter"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(lib, "FALLBACK_PATH", str(tmp_path / "sbin"))
    check = lib.check_tools(lib.Probe())
    assert f"add {tmp_path / 'sbin'} to PATH" in check.fix
    assert "apt-get install" in check.fix


def test_bpffs_not_a_bpffs_is_a_warning_with_the_mount_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_BPFFS", str(tmp_path))
    check = lib.check_bpffs(lib.Probe())
    assert check.status == lib.WARN and check.required
    assert "is not a bpffs" in check.detail
    assert f"mount -t bpf -o mode=0700 bpf {tmp_path}" in check.fix
    assert "hybridctl attach" in check.fix


def test_bpffs_unsupported_kernel_fails(monkeypatch, tmp_path):
    fs = tmp_path / "filesystems"
    fs.write_text("nodev\tsysfs\nnodev\tbpfx\n\text4\n")
    assert not lib.bpffs_supported(str(fs))
    fs.write_text("nodev\tsysfs\nnodev\tbpf\n")
    assert lib.bpffs_supported(str(fs))


def test_capabilities_parsed_from_status(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")
    caps = lib.effective_caps(str(status))
    assert caps >> lib.CAP_BPF & 1 and caps >> lib.CAP_NET_ADMIN & 1 and caps >> lib.CAP_SYS_ADMIN & 1
    status.write_text("CapEff:\t0000000000001000\n")
    caps = lib.effective_caps(str(status))
    assert caps >> lib.CAP_NET_ADMIN & 1 and not caps >> lib.CAP_SYS_ADMIN & 1


def test_privileges_without_root(monkeypatch):
    monkeypatch.setattr(lib.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(lib, "effective_caps", lambda: 1 << lib.CAP_NET_ADMIN)
    check = lib.check_privileges(lib.Probe())
    assert check.status == lib.FAIL and check.required
    assert check.detail.endswith("missing uid 0, CAP_BPF, CAP_SYS_ADMIN")
    assert "sudo" in check.fix


@pytest.mark.parametrize("text, flavour", [
    ("iptables v1.8.9 (nf_tables)\n", "nf_tables, v1.8.9"),
    ("iptables v1.8.7 (legacy)\n", "legacy, v1.8.7"),
    ("iptables v1.6.1\n", "legacy, v1.6.1"),
])
def test_iptables_flavour(text, flavour):
    assert lib.parse_iptables_version(text) == flavour


def test_first_error_picks_the_compiler_error():
    text = "In file included from x.c:1:\n/virtual/main.c:3:10: fatal error: 'uapi/linux/bpf.h' file not found\n1 error\n"
    assert lib.first_error(text) == "/virtual/main.c:3:10: fatal error: 'uapi/linux/bpf.h' file not found"


def test_missing_headers_point_at_setup(monkeypatch):
    pytest.importorskip("bcc", reason="bcc comes from Debian's python3-bpfcc")
    monkeypatch.setattr(lib, "kernel_headers", lambda: {"build": None, "source": None})
    check = lib.run_one("bcc compile", True, lib.check_bcc, lib.Probe())
    assert check.status == lib.FAIL
    assert check.detail.startswith("no kernel headers at /lib/modules/")
    assert "scripts/setup.sh" in check.fix and "linux-headers-amd64" in check.fix


def test_compile_error_is_reported_from_clang_not_the_terminal(monkeypatch, capfd):
    pytest.importorskip("bcc", reason="bcc comes from Debian's python3-bpfcc")
    monkeypatch.setattr(lib, "TEST_PROGRAM", "#include <hybrid/no_such_header.h>\n" + lib.TEST_PROGRAM)
    probe = lib.Probe()
    check = lib.run_one("bcc compile", True, lib.check_bcc, probe)
    assert check.status == lib.FAIL
    assert "hybrid/no_such_header.h' file not found" in check.detail
    assert "scripts/setup.sh" in check.fix
    # the attach checks reuse the failure instead of compiling again
    again = lib.run_one("xdp generic", True, lib.check_xdp_generic, probe)
    assert again.detail.startswith("no test program (bcc compile failed: compile failed:")
    assert "no_such_header" not in capfd.readouterr().err
