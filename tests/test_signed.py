"""``--subscription-sign``: the tool signs its drain and subscribe packets as a uWSGI master signs
its announces (core/subscription.c: a ``unix`` var, then ``sign``, the signature of every var
before it, which a router with ``--subscriptions-sign-check`` verifies with the key's public
key). Checked here with openssl itself; the routers' side is tested on a real signed fleet."""

from __future__ import annotations

import functools
import struct
import subprocess
from pathlib import Path

import pytest

import uwsgi_reload as ur
from tests.test_drain_logic import RouterSim
from tests.test_reload_logic import run_on
from tests.uwsgi_packets import decode_packet

NODE = ur.Node("domain.tld", "127.0.0.2:8001", False, 0, cores=1, weight=1)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    private = tmp_path / "domain.tld.key.pem"
    subprocess.run(
        ["openssl", "genrsa", "-out", str(private), "2048"], check=True, capture_output=True
    )
    subprocess.run(
        [
            "openssl",
            "rsa",
            "-in",
            str(private),
            "-pubout",
            "-out",
            str(tmp_path / "domain.tld.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return private


def verified(public: Path, packet: bytes, tmp_path: Path) -> bool:
    """What the router checks: the signature of the body before the ``sign`` var."""
    body = packet[4:]
    pos, base_end, signature = 0, 0, b""
    while pos < len(body):
        start = pos
        (size,) = struct.unpack_from("<H", body, pos)
        name = body[pos + 2 : pos + 2 + size]
        pos += 2 + size
        (size,) = struct.unpack_from("<H", body, pos)
        value = body[pos + 2 : pos + 2 + size]
        pos += 2 + size
        if name == b"sign":
            base_end, signature = start, value
    (tmp_path / "sig").write_bytes(signature)
    check = subprocess.run(
        ["openssl", "dgst", "-sha1", "-verify", str(public), "-signature", str(tmp_path / "sig")],
        input=body[:base_end],
        capture_output=True,
    )
    return check.returncode == 0


@pytest.mark.parametrize("command", [ur.Command.SUBSCRIBE, ur.Command.UNSUBSCRIBE])
def test_a_signed_packet_verifies_with_the_public_key(
    key: Path, tmp_path: Path, command: ur.Command
) -> None:
    sign = functools.partial(ur.openssl_sign, f"SHA1:{key}")
    packet = ur.Subscription(command, NODE).packet(sign, now=1_800_000_000.7)
    _, modifier2, pairs = decode_packet(packet)
    fields = dict(pairs)
    assert modifier2 == command
    # an unsubscribe is dated a second later, as uWSGI dates it (now + cmd)
    assert fields["unix"] == str(1_800_000_000 + command)
    assert [name for name, _ in pairs][-2:] == ["unix", "sign"]
    assert verified(tmp_path / "domain.tld.pem", packet, tmp_path)


def test_control_a_packet_changed_after_signing_does_not_verify(key: Path, tmp_path: Path) -> None:
    sign = functools.partial(ur.openssl_sign, f"SHA1:{key}")
    packet = ur.Subscription(ur.Command.UNSUBSCRIBE, NODE).packet(sign, now=1_800_000_000)
    forged = packet.replace(b"127.0.0.2:8001", b"127.0.0.2:8002")
    assert not verified(tmp_path / "domain.tld.pem", forged, tmp_path)


def signed_run(tmp_path: Path, spec: str, setup: object = None) -> tuple[int, str]:
    emperor = tmp_path / "emperor"
    emperor.mkdir()
    stack = RouterSim(["vassal_01.ini", "vassal_02.ini"])
    return run_on(stack, emperor, setup, subscription_server="ss.sock", subscription_sign=spec)


def test_a_run_signs_every_packet_it_sends(key: Path, tmp_path: Path) -> None:
    sent: list[bytes] = []

    def setup(stack: object) -> None:
        send = stack.send  # type: ignore[attr-defined]

        def keep(address: str, data: bytes) -> None:
            sent.append(data)
            send(address, data)

        stack.send = keep  # type: ignore[attr-defined]

    code, out = signed_run(tmp_path, f"SHA1:{key}", setup)
    assert code == ur.EXIT_OK, out
    assert len(sent) >= 4, out  # an unsubscribe and a subscribe per vassal
    assert all(verified(tmp_path / "domain.tld.pem", p, tmp_path) for p in sent)


def test_a_key_openssl_cannot_sign_with_is_refused_before_anything_is_touched(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    with pytest.raises(ur.ReloadError, match="--subscription-sign: openssl cannot sign"):
        signed_run(tmp_path, f"SHA1:{bad}")
