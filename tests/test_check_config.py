"""``elemta check-config`` finds everything in one pass, and ``serve`` finds nothing it missed.

Run as the operator runs it: the console script in a subprocess, on files in a
temporary folder.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from elemta.checks import check_config
from tests.test_cli import assert_config_error, elemta

LISTENER = '[[listeners]]\nname = "mx"\naddress = "127.0.0.1:{port}"\ntls = "none"\n'


def config(tmp_path: Path, text: str, *, listener: bool = True) -> Path:
    path = tmp_path / "elemta.toml"
    head = (f'[server]\nhostname = "mx.example.test"\nstate_dir = "state"\n'
            f'[spool]\npath = "queue"\n[metrics]\nenabled = false\n')
    path.write_text(head + (LISTENER.format(port=0) if listener else "") + text)
    return path


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return elemta("check-config", str(path), cwd=path.parent)


def write_certificate(tmp_path: Path, name: str, *, days: float,
                      key: ec.EllipticCurvePrivateKey | None = None) -> tuple[Path, Path]:
    """A self-signed certificate valid until ``days`` from now (negative: expired)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=400))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def tls_config(tmp_path: Path, cert_file: Path, key_file: Path) -> Path:
    path = config(tmp_path, f'[tls]\ncert_file = "{cert_file}"\nkey_file = "{key_file}"\n',
                  listener=False)
    with path.open("a") as f:
        f.write(LISTENER.format(port=0).replace('tls = "none"', 'tls = "starttls"'))
    return path


# ------------------------------------------------------------------ one pass


def test_core_keys_plugins_and_plugin_tables_are_reported_together(tmp_path: Path) -> None:
    path = config(tmp_path, '[log]\nlevel = "loud"\n'
                            '[plugins]\nenabled = ["datasource", "mailidr"]\n'
                            '[plugins.datasource]\nbakend = "toml"\n'
                            '[plugins.mailidr]\npath = "mail"\n')
    result = check(path)
    assert_config_error(result,
                        "log.level: got 'loud'",
                        "plugin 'mailidr' is not installed; did you mean \"maildir\"?",
                        'plugins.datasource.bakend: unknown key; did you mean "backend"?')
    # the table of the plugin that is not installed is not called "unknown" as well
    assert "[plugins.mailidr]: unknown plugin table" not in result.stderr


def test_a_misspelled_plugin_is_never_sent_to_a_package_of_that_name(tmp_path: Path) -> None:
    result = check(config(tmp_path, '[plugins]\nenabled = ["mailidr"]\n'))
    assert_config_error(result, 'did you mean "maildir"?')
    assert "pip install" not in result.stderr


def test_a_wrong_type_shows_the_value_given_and_an_example(tmp_path: Path) -> None:
    path = tmp_path / "elemta.toml"
    path.write_text(LISTENER.format(port=0) + '[server]\nmax_recipients = "lots"\n'
                    '[spool]\nmemory_bytes = "256k"\n[metrics]\nenabled = "yes please"\n')
    result = check(path)
    assert_config_error(result, 'server.max_recipients: got "lots"; write a whole number',
                        'spool.memory_bytes: got "256k"; write a whole number such as 25',
                        'metrics.enabled: got "yes please"; write true or false')
    assert "Input should be" not in result.stderr


def test_no_listeners_is_an_error(tmp_path: Path) -> None:
    assert_config_error(check(config(tmp_path, "", listener=False)),
                        "no [[listeners]]: the server would take no mail")


def test_a_clean_file_is_ok(tmp_path: Path) -> None:
    result = check(config(tmp_path, ""))
    assert result.returncode == 0, result.stderr
    assert "OK (1 listeners" in result.stdout
    assert result.stderr == ""


# ------------------------------------------------------------------ TLS files


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    path = tls_config(tmp_path, tmp_path / "nope.crt", tmp_path / "nope.key")
    assert_config_error(check(path), "[tls]:", "nope.crt: no such file")


def test_unreadable_key_is_named(tmp_path: Path) -> None:
    cert_file, key_file = write_certificate(tmp_path, "a", days=90)
    key_file.write_text("not a key\n")
    assert_config_error(check(tls_config(tmp_path, cert_file, key_file)), "[tls]:", str(key_file))


def test_a_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    cert_file, _ = write_certificate(tmp_path, "a", days=90)
    _, other_key = write_certificate(tmp_path, "b", days=90)
    assert_config_error(check(tls_config(tmp_path, cert_file, other_key)),
                        "does not belong to the certificate")


def test_an_expired_certificate_is_an_error_with_its_date(tmp_path: Path) -> None:
    cert_file, key_file = write_certificate(tmp_path, "old", days=-3)
    expired = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3))
    assert_config_error(check(tls_config(tmp_path, cert_file, key_file)),
                        f"expired on {expired:%Y-%m-%d}")


def test_a_certificate_about_to_expire_is_a_warning(tmp_path: Path) -> None:
    cert_file, key_file = write_certificate(tmp_path, "soon", days=5.5)
    result = check(tls_config(tmp_path, cert_file, key_file))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "in 5 days; renew it soon" in result.stderr
    assert "1 warnings" in result.stdout


# ------------------------------------------------------------------ listeners


def test_a_port_in_use_is_a_warning_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "elemta.toml"
        path.write_text(LISTENER.format(port=port))
        result = check(path)
    assert result.returncode == 0, result.stderr
    assert f"listeners[0].address: mx: cannot listen on 127.0.0.1:{port}: the port is in " \
           "use" in result.stderr


def test_an_address_this_machine_does_not_have_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "elemta.toml"
    path.write_text(LISTENER.format(port=2525).replace("127.0.0.1", "192.0.2.7"))
    result = check(path)
    assert "this machine has no address 192.0.2.7" in result.stderr, result.stderr
    assert "another server" not in result.stderr


def test_a_host_name_that_does_not_resolve_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "elemta.toml"
    path.write_text(LISTENER.format(port=2525).replace("127.0.0.1", "mail.invalid"))
    result = check(path)
    assert "the host name 'mail.invalid' does not resolve" in result.stderr, result.stderr
    assert "Unknown error" not in result.stderr


def test_serve_gives_the_real_reason_it_cannot_listen(tmp_path: Path) -> None:
    path = config(tmp_path, "", listener=False)
    with path.open("a") as f:
        f.write(LISTENER.format(port=2525).replace("127.0.0.1", "192.0.2.7"))
    result = elemta("serve", "--config", str(path), cwd=tmp_path, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "cannot listen on 192.0.2.7:2525: this machine has no address 192.0.2.7" \
        in result.stderr
    assert "another server" not in result.stderr


# ------------------------------------------------------------------ folders and the user


def test_a_spool_writable_by_everyone_is_refused(tmp_path: Path) -> None:
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue").chmod(0o777)
    assert_config_error(check(config(tmp_path, "")),
                        "[spool] path:", "is writable by every user (mode 0777)",
                        f"chmod o-w {tmp_path / 'queue'}")


def test_a_spool_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "queue").write_text("")
    assert_config_error(check(config(tmp_path, "")), "[spool] path:", "is not a directory")


def test_an_unknown_user_is_refused(tmp_path: Path) -> None:
    path = config(tmp_path, "")
    path.write_text(path.read_text().replace("[server]\n", '[server]\nuser = "nosuchuser"\n'))
    assert_config_error(check(path), "[server] user: there is no user 'nosuchuser'")


# ------------------------------------------------------------------ serve agrees


def test_serve_reports_everything_check_config_does_and_creates_nothing(tmp_path: Path) -> None:
    path = config(tmp_path, '[plugins]\nenabled = ["datasource", "mailidr"]\n'
                            '[plugins.datasource]\nbakend = "toml"\n')
    checked = check(path)
    served = elemta("serve", "--config", str(path), cwd=tmp_path, timeout=60)
    assert served.returncode == 2
    assert served.stderr.strip() == checked.stderr.strip()
    # nothing was created: no spool, no state (certificate), no database
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elemta.toml"]


def test_the_report_api_separates_errors_and_warnings(tmp_path: Path) -> None:
    cert_file, key_file = write_certificate(tmp_path, "soon", days=3)
    report = check_config(tls_config(tmp_path, cert_file, key_file))
    assert report.errors == []
    assert len(report.warnings) == 1 and "renew it soon" in report.warnings[0]
    assert report.settings is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to see a port below 1024 as usable")
def test_root_without_a_user_is_told_to_set_one(tmp_path: Path) -> None:
    path = tmp_path / "elemta.toml"
    path.write_text(LISTENER.format(port=0).replace(":0", ":25"))
    report = check_config(path, probe_listeners=False)
    assert any('set user = "elemta"' in w for w in report.warnings), report.warnings
