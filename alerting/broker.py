"""The embedded default broker: Mosquitto as a child process, amqtt in-process as a fallback.

``prism demo`` and users with no broker configured get a real MQTT broker on a free
loopback port with a generated config. Mosquitto is preferred (MQTT v5, persistence,
TLS, password files); amqtt is only used when no Mosquitto binary exists, and says so in
:attr:`EmbeddedBroker.notice`. The child never outlives us: it is killed and reaped on
``close()``, at interpreter exit, and (Linux) when the parent process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from alerting.errors import AlertingError

_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
AMQTT_NOTICE = ("no Mosquitto binary found: using the in-process amqtt broker "
                "(MQTT 3.1.1 only, no v5, no TLS or password file, no persistence); "
                "install mosquitto for production use")
"""Connect to it with ``BrokerConfig(protocol="3.1.1")`` to skip the MQTT 5 attempt."""


class BrokerStartError(AlertingError):
    """The embedded broker could not be started (the line says why)."""


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary (PATH first, then the usual sbin dirs), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in _SEARCH_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_mosquitto_passwd() -> str | None:
    """Path of ``mosquitto_passwd`` next to Mosquitto (PATH or the sbin/bin dirs), or None."""
    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    for folder in _SEARCH_DIRS:
        candidate = Path(folder) / "mosquitto_passwd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def write_password_file(path: str | Path, users: Mapping[str, str]) -> Path:
    """Create a Mosquitto password file (hashed by ``mosquitto_passwd``) for ``users``.

    Raises:
        BrokerStartError: mosquitto_passwd is not installed or refused the input.
    """
    tool = find_mosquitto_passwd()
    if tool is None:
        raise BrokerStartError("mosquitto_passwd not found (install the mosquitto package)")
    out = Path(path)
    out.touch(mode=0o600)
    for user, password in users.items():
        done = subprocess.run([tool, "-b", str(out), user, password], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise BrokerStartError(f"mosquitto_passwd failed for {user!r}: "
                                   f"{done.stderr.strip() or done.stdout.strip()}")
    out.chmod(0o600)
    return out


def _ephemeral_floor() -> int:
    """The lowest local port the kernel hands to outgoing connections (Linux default if unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago, below the ephemeral range.

    The broker is restarted on the same port after an outage. A port from the ephemeral
    range can be taken meanwhile as the local end of an outgoing connection (even a
    client's own reconnect to it: TCP self-connect), and the restart then fails with
    "Address already in use" (seen once in a 30 s outage test). So the port is drawn
    from 20000 (or 1024) up to that range; the kernel's pick is only the fallback.
    """
    floor = _ephemeral_floor()
    pool = range(20000 if floor > 20000 else 1024, floor)
    for port in random.sample(pool, min(64, len(pool))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    """True when a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _logged_running(log: Path, offset: int) -> bool:
    """True when Mosquitto's log (after ``offset``) says it is running."""
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return b" running" in fh.read()
    except FileNotFoundError:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child when its parent dies (no orphaned brokers)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill, then wait for a child broker (safe to call twice)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


class EmbeddedBroker:
    """A loopback MQTT broker owned by this process (context manager, idempotent close).

    Args:
        prefer: ``"mosquitto"`` (default; falls back to amqtt when no binary exists) or
            ``"amqtt"`` to force the in-process fallback (tests use it).
        port: a fixed port; default a free one picked at start.
        password_file: a Mosquitto password file; clients must then log in.
        allow_anonymous: whether clients without credentials are accepted (default: only
            when no password file is given).
        certfile, keyfile: the server certificate and key: the listener speaks TLS.
        cafile: CA for client certificates; with ``require_certificate`` clients must
            present one it signed.
        persistence: keep sessions and queued QoS 1 messages across ``stop()``/``start()``.
        mosquitto: path of the binary (default :func:`find_mosquitto`).
        extra_config: further ``mosquitto.conf`` lines, for example a bridge's
            ``connection`` block (:func:`alerting.bridge.bridge_section`).
        start: start at construction (default True).
    """

    def __init__(self, *, prefer: Literal["mosquitto", "amqtt"] = "mosquitto",
                 port: int | None = None, password_file: str | Path | None = None,
                 allow_anonymous: bool | None = None, certfile: str | Path | None = None,
                 keyfile: str | Path | None = None, cafile: str | Path | None = None,
                 require_certificate: bool = False, persistence: bool = True,
                 mosquitto: str | None = None, extra_config: Sequence[str] = (),
                 start: bool = True) -> None:
        self.host = "127.0.0.1"
        self.notice = ""
        binary = mosquitto or (find_mosquitto() if prefer == "mosquitto" else None)
        self.kind: Literal["mosquitto", "amqtt"] = "mosquitto" if binary else "amqtt"
        self._binary = binary
        if self.kind == "amqtt":
            self.notice = AMQTT_NOTICE
            if password_file or certfile or cafile:
                raise BrokerStartError("the amqtt fallback broker supports neither TLS nor "
                                       "password files: install mosquitto")
        if (certfile is None) != (keyfile is None):
            raise BrokerStartError("embedded broker: certfile and keyfile go together")
        self._password_file = Path(password_file) if password_file else None
        self._allow_anonymous = (self._password_file is None if allow_anonymous is None
                                 else allow_anonymous)
        self._certfile = Path(certfile) if certfile else None
        self._keyfile = Path(keyfile) if keyfile else None
        self._cafile = Path(cafile) if cafile else None
        self._require_certificate = require_certificate
        self._persistence = persistence
        self._extra_config = tuple(extra_config)
        if self.kind == "amqtt" and self._extra_config:
            raise BrokerStartError("the amqtt fallback broker takes no mosquitto.conf lines: "
                                   "install mosquitto")
        self._dir = Path(tempfile.mkdtemp(prefix="prism-broker-"))
        self.port = port or 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._amqtt: _AmqttThread | None = None
        self._closed = False
        self._dir_finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        if start:
            try:
                self.start()
            except BaseException:
                self.close()  # no temp dir or half-started child left behind
                raise

    # ------------------------------------------------------------------ public
    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>`` (``mqtts://`` when the listener speaks TLS)."""
        scheme = "mqtts" if self._certfile else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the broker is serving."""
        if self._amqtt is not None:
            return self._amqtt.running
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The Mosquitto child's pid (None for amqtt or when stopped)."""
        return self._proc.pid if self._proc is not None and self.running else None

    def log_text(self) -> str:
        """What Mosquitto wrote to its log so far (for test failure messages)."""
        path = self._dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> EmbeddedBroker:
        """Start serving (again, on the same port after :meth:`stop`); waits until ready.

        Returns ``self`` so ``EmbeddedBroker(start=False).start().url`` reads naturally.

        Raises:
            BrokerStartError: the broker exited or did not accept connections in time.
        """
        if self._closed:
            raise BrokerStartError("embedded broker is closed")
        if self.running:
            return self
        fixed = self.port != 0
        for attempt in range(5):
            if not fixed:
                self.port = free_port(self.host)
            try:
                if self.kind == "mosquitto":
                    self._start_mosquitto()
                else:
                    self._start_amqtt()
                return self
            except BrokerStartError:
                self._stop_quietly()
                if fixed and attempt < 4:  # same port: the old socket may linger a moment
                    time.sleep(0.2)
                    continue
                if fixed or attempt == 4:
                    raise
        raise BrokerStartError(f"embedded broker could not start on port {self.port}")

    def stop(self) -> None:
        """Stop serving, keeping the port and the persisted state for :meth:`start`."""
        self._stop_quietly()

    def close(self) -> None:
        """Stop and delete the generated config (idempotent)."""
        if self._closed:
            return
        self._stop_quietly()
        self._closed = True
        self._dir_finalizer()  # removes the generated config and logs (once)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ mosquitto
    def config_text(self) -> str:
        """The generated ``mosquitto.conf`` for the current port."""
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
            f"persistence {'true' if self._persistence else 'false'}",
            f"persistence_location {self._dir}/",
            "autosave_interval 0",
            f"log_dest file {self._dir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 0",  # never drop queued QoS 1 messages of a stored session
            "max_inflight_messages 0",
            "set_tcp_nodelay true",  # an alert is one small packet: never wait to coalesce
        ]
        if self._password_file:
            lines.append(f"password_file {self._password_file}")
        if self._certfile and self._keyfile:
            lines += [f"certfile {self._certfile}", f"keyfile {self._keyfile}"]
            if self._cafile:
                lines.append(f"cafile {self._cafile}")
            lines.append(f"require_certificate {'true' if self._require_certificate else 'false'}")
        if os.geteuid() == 0:
            lines.append("user root")  # else Mosquitto drops to 'mosquitto' and cannot read
        lines += self._extra_config  # last: a bridge's `connection` block ends the file
        return "\n".join(lines) + "\n"

    def _start_mosquitto(self) -> None:
        assert self._binary is not None
        conf = self._dir / "mosquitto.conf"
        conf.write_text(self.config_text())
        conf.chmod(0o600)
        log = self._dir / "mosquitto.log"
        offset = log.stat().st_size if log.exists() else 0
        self._stderr = open(self._dir / "stderr.log", "ab")  # noqa: SIM115 - kept open
        self._proc = subprocess.Popen(
            [self._binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
            stdout=self._stderr, stderr=self._stderr, close_fds=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._finalizer = weakref.finalize(self, _reap, self._proc)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerStartError(f"mosquitto exited with status {self._proc.returncode} "
                                       f"on port {self.port}: {self._last_error_line()}")
            # "running" is logged only once every listener is open: a connect alone could
            # reach another process that holds the port.
            if _logged_running(log, offset) and _accepts(self.host, self.port):
                return
            time.sleep(0.02)
        raise BrokerStartError(f"mosquitto did not accept connections on port {self.port} "
                               "within 10 s")

    def _last_error_line(self) -> str:
        text = ""
        for name in ("stderr.log", "mosquitto.log"):
            path = self._dir / name
            if path.exists():
                text += path.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if "rror" in ln] or text.splitlines()
        return lines[-1].strip() if lines else "no output"

    def _stop_quietly(self) -> None:
        if self._proc is not None:
            _reap(self._proc)
            if self._finalizer is not None:
                self._finalizer.detach()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._amqtt is not None:
            self._amqtt.stop()
            self._amqtt = None

    # ------------------------------------------------------------------ amqtt
    def _start_amqtt(self) -> None:
        self._amqtt = _AmqttThread(self.host, self.port)
        self._amqtt.start()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._amqtt.error:
                raise BrokerStartError(f"amqtt broker failed on port {self.port}: "
                                       f"{self._amqtt.error}")
            if self._amqtt.running:  # set once amqtt's listener socket is open
                return
            time.sleep(0.02)
        raise BrokerStartError(f"amqtt did not accept connections on port {self.port} in 10 s")


class _AmqttThread:
    """amqtt's broker on its own event loop in a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.running = False
        self.error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="amqtt-broker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=10)
        self.running = False

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as exc:  # reported through .error; the thread must not print
            self.error = f"{type(exc).__name__}: {exc}"

    async def _serve(self) -> None:
        from amqtt.broker import Broker

        # amqtt logs every refused or odd client at WARNING with tracebacks; with no
        # handler configured those would reach stderr (and scribble over the TUI).
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        broker = Broker(config)
        await broker.start()
        self.running = True
        try:
            await self._stop.wait()
        finally:
            self.running = False
            await broker.shutdown()
