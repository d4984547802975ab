"""`kdns serve` / `kdns records` flags: a bad flag or input is one sentence naming
it, exit status 2, and nothing half-started."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest

from kdns import cli
from serverutil import HOST, ROOT
from zonefixtures import sample_image

EXAMPLE = os.path.join(ROOT, "examples", "cluster.yaml")


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "zone.img"
    path.write_bytes(sample_image())
    return str(path)


def run_main(capsys, argv) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


BAD_FLAGS = [
    ([], "--from-file"),
    (["--from-file", "/nonexistent/cluster.yaml"], "--from-file"),
    (["--dns-port", "70000"], "--dns-port"),
    (["--dns-port", "fifty-three"], "--dns-port"),
    (["--workers", "0"], "--workers"),
    (["--worker-processes", "0"], "--worker-processes"),
    (["--worker-processes", "two"], "--worker-processes"),
    (["--workers", "2", "--worker-processes", "3"], "--worker-processes"),
    (["--pods", "sometimes"], "--pods"),
    (["--dns-bind-address", "10.0.0"], "--dns-bind-address"),
    (["--ttl", "-1"], "--ttl"),
    (["--edns-udp-size", "100"], "--edns-udp-size"),
    (["--tcp-idle-timeout", "0"], "--tcp-idle-timeout"),
    (["--tcp-max-connections", "0"], "--tcp-max-connections"),
    (["--domain", "cluster..local"], "--domain"),
    (["--log-level", "chatty"], "--log-level"),
    (["--lameduck", "soon"], "--lameduck"),
    (["--v", "loud"], "--v"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--healthz-port", "5300", "--dns-port", "5300"], "--healthz-port"),
    (["--metrics-port", "5300", "--dns-port", "5300", "--healthz-port", "0"], "--metrics-port"),
]


@pytest.mark.parametrize("extra,flag", BAD_FLAGS, ids=[f for _, f in BAD_FLAGS])
def test_bad_flag_is_one_sentence_naming_it(capsys, image_file, extra, flag):
    source = [] if extra and extra[0] == "--from-file" or not extra else ["--from-image", image_file]
    code, out, err = run_main(capsys, ["serve", *source, *extra])
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err and "Traceback" not in err


def test_from_file_and_from_image_are_exclusive(capsys, image_file):
    code, _, err = run_main(capsys, ["serve", "--from-file", EXAMPLE, "--from-image", image_file])
    assert code == 2 and "--from-image" in err and len(err.strip().splitlines()) == 1


def leftovers(mark: str) -> list[int]:
    """Processes still running with our marker in their environment."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mark.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def run_kdns(*args, timeout=30):
    """`python -m kdns ...` in a child, with a marker to find anything it left running."""
    mark = f"KDNS_TEST_MARK={uuid.uuid4()}"
    env = {**os.environ, "KDNS_TEST_MARK": mark.split("=", 1)[1]}
    proc = subprocess.run([sys.executable, "-m", "kdns", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, leftovers(mark)


def serve_args(*source, port=None):
    # DNS port 0 unless a test names one: the kernel picks it as kdns binds, so no other
    # socket can take it in between and turn the expected failure into another one.
    return ["serve", *source, "--dns-bind-address", HOST, "--dns-port", str(port or 0),
            "--healthz-port", "0", "--metrics-port", "0", "--health-port", "0",
            "--ready-port", "0", "--sidecar-port", "0", "--workers", "2"]


def assert_clean_failure(proc, left, *words):
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not left, f"processes left running: {left}"


def test_invalid_zone_file_exits_2_before_starting(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("items: [this is not: a kubernetes list")
    proc, left = run_kdns(*serve_args("--from-file", str(bad)))
    assert_clean_failure(proc, left, str(bad))


def test_unreadable_zone_file_exits_2(tmp_path):
    # A directory: unreadable as a file even for root (a mode-0 file is not, for root).
    proc, left = run_kdns(*serve_args("--from-file", str(tmp_path)))
    assert_clean_failure(proc, left, "--from-file", str(tmp_path), "not a readable file")


def test_garbage_image_exits_2(tmp_path):
    bad = tmp_path / "zone.img"
    bad.write_bytes(b"KDNSIMG1" + b"\0" * 100)
    proc, left = run_kdns(*serve_args("--from-image", str(bad)))
    assert_clean_failure(proc, left, str(bad), "not a valid kdns zone image")


def test_image_with_bad_checksum_exits_2(tmp_path):
    img = bytearray(sample_image())
    img[-1] ^= 0xFF
    bad = tmp_path / "zone.img"
    bad.write_bytes(bytes(img))
    proc, left = run_kdns(*serve_args("--from-image", str(bad)))
    assert_clean_failure(proc, left, str(bad), "crc32 mismatch")


def test_dns_port_in_use_exits_2(image_file):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))                    # no SO_REUSEPORT: kdns cannot share it
        port = taken.getsockname()[1]
        proc, left = run_kdns(*serve_args("--from-image", image_file, port=port))
    assert_clean_failure(proc, left, "--dns-port", str(port))


def test_http_port_in_use_exits_2(image_file):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((HOST, 0))
        taken.listen()
        http_port = taken.getsockname()[1]
        args = serve_args("--from-image", image_file)
        args[args.index("--healthz-port") + 1] = str(http_port)
        proc, left = run_kdns(*args)
    assert_clean_failure(proc, left, "--healthz-port")


def test_records_prints_the_zone():
    proc, _ = run_kdns("records", "--from-file", EXAMPLE)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("kubernetes.default.svc.cluster.local.") and "10.96.0.1" in line
               for line in lines), proc.stdout[:2000]


def test_records_with_another_domain():
    proc, _ = run_kdns("records", "--from-file", EXAMPLE, "--domain", "example.internal",
                       "--ttl", "7")
    assert proc.returncode == 0, proc.stderr
    assert "kubernetes.default.svc.example.internal.\t7\tIN\tA\t10.96.0.1" in proc.stdout


def test_records_bad_file_exits_2(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("items: [this is not: a kubernetes list")
    proc, _ = run_kdns("records", "--from-file", str(bad))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert str(bad) in proc.stderr


@pytest.mark.parametrize("text,seconds", [("5s", 5.0), ("500ms", 0.5), ("1m", 60.0), ("2", 2.0),
                                          ("0", 0.0), ("1m30s", 90.0), ("1.5", 1.5), ("1h", 3600.0)])
def test_lameduck_accepts_go_durations(text, seconds):
    assert cli.build_parser().parse_args(["serve", "--lameduck", text]).lameduck == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "-1s", "-1", "1h1s", "5 s"])
def test_a_bad_duration_flag_exits_2(capsys, text):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["serve", "--lameduck", text])
    assert e.value.code == 2 and "--lameduck" in capsys.readouterr().err


def test_help_lists_the_flags(capsys):
    code, out, _ = run_main(capsys, ["serve", "--help"])
    assert code == 0
    for flag in ("--from-file", "--domain", "--dns-bind-address", "--dns-port", "--ttl",
                 "--workers", "--healthz-port", "--metrics-port", "--pods", "--edns-udp-size",
                 "--tcp-idle-timeout", "--tcp-max-connections", "--log-level", "--lameduck"):
        assert flag in out
