"""The foundation: thaw/serve/tls.py (generation, CA reuse, hot reload) and thaw/cli.py (env fallbacks,
exit codes)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from thaw import cli
from thaw.dev.sandbox import thaw_cli
from thaw.serve.tls import ReloadingContext, generate, write_cert_dir

# --- tls ------------------------------------------------------------------------------------------


def test_generate_sans_usage_and_chain() -> None:
    gen, _, ca = generate(["thaw-webhook.thaw-system.svc", "localhost"], ["127.0.0.1"], days=7)
    cert = x509.load_pem_x509_certificate(gen.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["thaw-webhook.thaw-system.svc", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert base64.b64decode(gen.ca_bundle) == gen.ca_pem
    with pytest.raises(ValueError, match="at least one DNS name or IP"):
        generate([], [])


def test_write_cert_dir_reuses_the_ca_and_keeps_keys_private(tmp_path: Path) -> None:
    first = write_cert_dir(tmp_path, ["localhost"])
    second = write_cert_dir(tmp_path, ["localhost"])
    assert first.ca_pem == second.ca_pem and first.cert_pem != second.cert_pem
    for name in ("tls.key", "ca.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    x509.load_pem_x509_certificate(second.cert_pem).verify_directly_issued_by(ca)


def _serial(ctx: ssl.SSLContext, cert_dir: Path) -> int:
    # The certificate a context serves, read back through a real in-memory handshake.
    client = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli_obj = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    srv_obj = ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (cli_obj, srv_obj):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    der = cli_obj.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_reloading_context_follows_rotation_and_survives_a_torn_one(tmp_path: Path) -> None:
    write_cert_dir(tmp_path, ["localhost"])
    rc = ReloadingContext(tmp_path)
    rc.CHECK_INTERVAL_S = 0.0  # check on every call in this test
    old = _serial(rc.current(), tmp_path)
    gen = write_cert_dir(tmp_path, ["localhost"])
    new = _serial(rc.current(), tmp_path)
    assert new != old and new == x509.load_pem_x509_certificate(gen.cert_pem).serial_number
    # A rotation caught half-way (a certificate whose key has not arrived): keep serving the last good.
    other = generate(["localhost"])[0]
    (tmp_path / "tls.crt").write_bytes(other.cert_pem)
    assert _serial(rc.current(), tmp_path) == new
    (tmp_path / "tls.key").write_bytes(other.key_pem)
    assert rc.current() is not None


def test_reloading_context_fails_loudly_without_certificate(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ReloadingContext(tmp_path)


# --- cli ------------------------------------------------------------------------------------------


def parse(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    for key in list(os.environ):
        if key.startswith("THAW_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cli.build_parser().parse_args(argv)


def test_every_flag_falls_back_to_its_env(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse(
        ["fetch"],
        {
            "THAW_STORE": "/s",
            "THAW_CACHE": "/c",
            "THAW_NAME": "qwen",
            "THAW_WORKLOAD": "w",
            "THAW_TRUST": "/t",
            "THAW_PLAN": "/p/plan.json",
            "THAW_REGISTRY_AUTH": "/r/auth",
        },
        monkeypatch,
    )
    # --store is the store factory's spec (a path, file:// or oci://: thaw/snapshot/stores.py), a string.
    assert (args.store, args.cache, args.name, args.workload, args.trust, args.plan) == (
        "/s",
        Path("/c"),
        "qwen",
        "w",
        Path("/t"),
        Path("/p/plan.json"),
    )
    assert args.registry_auth == Path("/r/auth") and args.registry_ca is None


def test_command_line_wins_and_types_and_lists_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse(
        ["webhook", "--port", "9443"],
        {"THAW_PORT": "1", "THAW_CERT_DIR": "/tls", "THAW_WORKERS": "3"},
        monkeypatch,
    )
    assert (args.port, args.cert_dir, args.workers) == (9443, Path("/tls"), 3)
    args = parse(["certs"], {"THAW_OUT": "/o", "THAW_DNS": "a,b", "THAW_IP": "127.0.0.1"}, monkeypatch)
    assert (args.dns, args.ip) == (["a", "b"], ["127.0.0.1"])


def test_webhook_env_names_match_the_flags_the_injection_uses() -> None:
    # The webhook configures thaw fetch / thaw exec only through these; each must be a real flag.
    fetch = {a.dest for a in _sub("fetch")._actions}
    exec_ = {a.dest for a in _sub("exec")._actions}
    assert {"store", "cache", "name", "workload", "trust", "plan"} <= fetch
    assert {"plan", "checkpoint", "ready", "store", "key", "name", "workload", "sleep", "wake"} <= exec_


def _sub(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = action.choices[name]
    return sub


def test_exit_codes_and_one_line_errors(tmp_path: Path) -> None:
    done = thaw_cli("webhook")  # --cert-dir missing
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--cert-dir" in done.stderr
    done = thaw_cli("certs", "--out", str(tmp_path))  # no SANs: a UsageError from the command
    assert done.returncode == 2 and "--dns" in done.stderr
    done = thaw_cli("webhook", env={"THAW_CERT_DIR": str(tmp_path / "none")})  # env satisfies the flag
    assert done.returncode == 1 and "tls.crt" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = thaw_cli("certs", env={"THAW_OUT": str(tmp_path / "c"), "THAW_DNS": "localhost"})
    assert done.returncode == 0 and (tmp_path / "c" / "tls.crt").exists()
    assert base64.b64decode(done.stdout.strip()) == (tmp_path / "c" / "ca.crt").read_bytes()
