"""Start a local Mosquitto with the shipped config, ACL and a fresh password file.

For tests and for trying the bridge on a workstation. The shipped files (etc/) are what
is run, with the listener and file paths rewritten: the tests exercise the real ACL.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

ETC = Path(__file__).with_name("etc")


def mosquitto_binary() -> str | None:
    for name in ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if found := shutil.which(name):
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


class MosquittoBroker:
    """``with MosquittoBroker(tmp, {"engine": "pw", ...}) as b: b.port``"""

    def __init__(self, workdir: Path, users: dict[str, str], port: int | None = None, *,
                 tls: Path | None = None) -> None:
        """`tls`: a folder of `tapescope mqtt certs` (ca.crt, broker.crt, broker.key); with it
        the shipped TLS listeners run too, on 127.0.0.1 (`tls_port`: passwords over TLS,
        `cert_port`: client certificates), else only the plain one."""
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("no mosquitto binary on this machine (Debian: apt-get install mosquitto)")
        self.binary = binary
        self.passwd_tool = shutil.which("mosquitto_passwd") or str(Path(binary).with_name("mosquitto_passwd"))
        self.dir = Path(workdir)
        self.users = users
        self.port = port or free_port()
        self.tls = tls
        self.tls_port = free_port() if tls is not None else 0
        self.cert_port = free_port() if tls is not None else 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def _write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        passwd = self.dir / "passwd"
        passwd.unlink(missing_ok=True)
        for user, pw in self.users.items():
            args = [self.passwd_tool, "-b", *([] if passwd.exists() else ["-c"]), str(passwd), user, pw]
            subprocess.run(args, check=True, capture_output=True, timeout=10)
        passwd.chmod(0o600)
        acl = self.dir / "acl"
        shutil.copy(ETC / "acl", acl)
        acl.chmod(0o600)
        lines = []
        tls_ports = iter((self.tls_port, self.cert_port))
        for line in (ETC / "mosquitto.conf").read_text().splitlines():
            if line.startswith("# tests: TLS listeners follow") and self.tls is None:
                break
            if line.startswith("listener 1883"):
                line = f"listener {self.port} 127.0.0.1"
            elif line.startswith("listener "):
                line = f"listener {next(tls_ports)} 127.0.0.1"
            elif line.startswith("password_file "):
                line = f"password_file {passwd}"
            elif line.startswith("acl_file "):
                line = f"acl_file {acl}"
            elif self.tls is not None and line.split(" ")[0] in ("cafile", "certfile", "keyfile"):
                key = line.split(" ")[0]
                name = {"cafile": "ca.crt", "certfile": "broker.crt", "keyfile": "broker.key"}[key]
                line = f"{key} {self.tls / name}"
            lines.append(line)
        # Started as root, mosquitto drops to the 'mosquitto' user, which cannot read a private
        # temporary folder: run it as whoever starts it.
        lines.append(f"user {getpass.getuser()}")
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> None:
        conf = self._write_config()
        self._log = open(self.dir / "mosquitto.log", "wb")  # kept open for the process's lifetime
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-2000:]}")
            if all(_listening(p) for p in (self.port, self.tls_port, self.cert_port) if p):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on 127.0.0.1:{self.port} (and its TLS ports) within "
                           f"{timeout_s} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
