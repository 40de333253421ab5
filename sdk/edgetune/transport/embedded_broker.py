"""An MQTT broker inside the current process, for demos, tests and single-machine runs.

Running ``mosquitto`` is the production answer; this exists so that ``edgetune`` works on a
laptop with nothing else installed. It wraps amqtt (pure Python, MQTT 3.1.1), which is an
optional extra, in a daemon thread that owns its own asyncio loop, so synchronous callers
(paho clients, the aggregator daemon) never see asyncio.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amqtt.broker import Broker

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
# amqtt logs every connection at INFO and `transitions` (its state machines) every state change.
_NOISY_LOGGERS = ("amqtt", "transitions")
_LISTENER = "default"
_AUTH_PLUGIN = "OpenAuthPlugin"


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` served from a background thread.

    Every client is accepted without credentials; retained messages, last wills and
    persistent sessions (``clean_session=False``) work as in Mosquitto. amqtt has no
    packet-size limit, so multi-MiB adapter updates pass unchanged.
    ``port=0`` lets the OS choose a free port, read back after :meth:`start`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {port}")
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None

    @property
    def port(self) -> int:
        """The port the broker listens on (the OS-chosen one when constructed with ``port=0``)."""
        if self._port is None:
            raise RuntimeError("EmbeddedBroker is not running: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port``, the form edgetune's MQTT transport accepts."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start serving; return once the listening socket accepts connections.

        Raises RuntimeError with the reason (amqtt missing, port taken, timeout) on failure.
        """
        if self._thread is not None:
            raise RuntimeError(f"EmbeddedBroker is already running at {self.url}")
        broker_cls = _import_amqtt_broker()
        _quiet_noisy_loggers()
        self._check_port_free()

        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=_run_loop, args=(loop,), name="edgetune-embedded-broker", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        future = asyncio.run_coroutine_threadsafe(self._serve(broker_cls), loop)
        try:
            self._port = future.result(timeout=_START_TIMEOUT_S)
        except TimeoutError as exc:
            future.cancel()
            self._stop_loop()
            raise RuntimeError(
                f"embedded MQTT broker did not start on {self._host}:{self._requested_port} "
                f"within {_START_TIMEOUT_S:.0f} s"
            ) from exc
        except Exception as exc:
            self._stop_loop()
            raise RuntimeError(
                f"embedded MQTT broker could not start on {self._host}:{self._requested_port}: {exc}"
            ) from exc
        logger.info("embedded MQTT broker listening at %s", self.url)
        return self

    def stop(self) -> None:
        """Close every client session and the listener, then end the thread. Safe to call twice."""
        if self._thread is None:
            return
        if self._broker is not None and self._loop is not None:
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                future.result(timeout=_STOP_TIMEOUT_S)
            except Exception:
                # The listener may linger until the loop closes below; nothing else to do.
                logger.warning("embedded MQTT broker did not shut down cleanly", exc_info=True)
        url = self.url if self._port is not None else None
        self._stop_loop()
        logger.info("embedded MQTT broker at %s stopped", url)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _serve(self, broker_cls: type[Broker]) -> int:
        """Build and start the amqtt broker on its loop (amqtt binds itself to the running loop)."""
        self._broker = broker_cls(_broker_config(self._host, self._requested_port))
        await self._broker.start()
        return _bound_port(self._broker)

    def _check_port_free(self) -> None:
        """Fail early, with a plain message, instead of amqtt's logged traceback."""
        if self._requested_port == 0:
            return
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # Same option asyncio sets on the real listener, so TIME_WAIT leftovers don't count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self._host, self._requested_port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise RuntimeError(
                        f"port {self._requested_port} on {self._host} is already in use; "
                        "stop whatever holds it or use port=0 to pick a free one"
                    ) from exc
                where = f"{self._host}:{self._requested_port}"
                raise RuntimeError(f"cannot listen on {where}: {exc}") from exc

    def _stop_loop(self) -> None:
        """End the loop thread and forget the broker; used by stop() and failed starts."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=_STOP_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("embedded MQTT broker thread did not exit; leaving it (daemon)")
            else:
                loop.close()
        self._loop = self._thread = self._broker = None
        self._port = None


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Thread body: run the loop until stopped, then cancel what amqtt left so nothing leaks."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())


def _broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt's dict config: one TCP listener and open auth, nothing else.

    Naming ``plugins`` replaces amqtt's defaults, which add a ``$SYS`` publisher (a periodic
    task and a psutil deprecation warning) and packet/event loggers we don't need.
    """
    # Never bracket IPv6 hosts: amqtt splits at the last ':' and would pass "[::1]" to the resolver.
    return {
        "listeners": {_LISTENER: {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {f"{__name__}.{_AUTH_PLUGIN}": {}},
    }


def __getattr__(name: str) -> Any:
    """Let amqtt load the auth plugin by dotted path while this module still imports without amqtt."""
    if name == _AUTH_PLUGIN:
        return _open_auth_plugin()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _open_auth_plugin() -> type:
    """Build the plugin class; it must subclass amqtt's base, hence built only once amqtt is needed."""
    from amqtt.plugins.base import BaseAuthPlugin
    from amqtt.session import Session

    class OpenAuthPlugin(BaseAuthPlugin):
        """Accept every client, like ``allow_anonymous true`` in Mosquitto.

        Not amqtt's AnonymousAuthPlugin: it flags sessions anonymous, and amqtt then forgets an
        anonymous session (its subscriptions and queued QoS 1/2 messages) about a second after
        it disconnects, even with ``clean_session=False``. Mosquitto keeps it, and devices that
        drop off Wi-Fi rely on that.
        """

        async def authenticate(self, *, session: Session) -> bool:
            return True

    return OpenAuthPlugin


def _bound_port(broker: Broker) -> int:
    """The port the OS actually gave the listener (amqtt 0.12 has no public accessor for it)."""
    server = broker._servers[_LISTENER].instance
    return int(server.sockets[0].getsockname()[1])


def _import_amqtt_broker() -> type[Broker]:
    """Import amqtt only when a broker is started: it is the optional ``broker`` extra."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise RuntimeError(
            "the embedded MQTT broker needs amqtt: pip install 'edgetune[broker]' "
            "(or point edgetune at an external broker such as mosquitto)"
        ) from exc
    return Broker


def _quiet_noisy_loggers() -> None:
    """Hold amqtt's chatty loggers at WARNING unless the user has set a level on them."""
    for name in _NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        if noisy.level == logging.NOTSET:
            noisy.setLevel(logging.WARNING)
